"""Reliability: uncertainty metrics (and, as they land, the uncertainty wrappers)."""
