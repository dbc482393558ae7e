"""Fine-tune task kinds (one object per kind, listed in :mod:`training.tasks.registry`), their data,
features, batches, contamination check and predictions."""
