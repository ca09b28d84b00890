"""Evaluation: generation checks and held-out loss, with the run's own ChatFormat."""
