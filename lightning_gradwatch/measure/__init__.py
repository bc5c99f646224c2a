"""Measuring, free of logging: block discovery, probes (forward hook -> tensor hook -> device buffer), the reduction across ranks and the measurement record."""
