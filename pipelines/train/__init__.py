"""Training: Ray Train data-parallel AMP training of the IMHN, its config and data (docs/training.md)."""
