"""Callbacks of the training loop: what happens around a step (see :mod:`training.callbacks.base`)."""
