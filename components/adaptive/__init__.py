"""Adaptive-computation wrappers (``adaptive.*``)."""
