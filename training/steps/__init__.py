"""Step modules: what one workload does per step (see :mod:`training.steps.base`)."""
