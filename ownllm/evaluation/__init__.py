"""Evaluation: held-out loss and bits per byte (more suites join with later stages)."""
