"""Diagnosing: model facts, the run's history of figures, and findings with their evidence and fixes."""
