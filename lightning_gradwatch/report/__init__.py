"""Offline reports over finished runs."""
