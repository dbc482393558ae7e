"""The events of the training loop and the callback interface.

The loop (:class:`training.trainer.Trainer`) calls every callback, in list order, at these
events and at no others:

- ``pre_step(trainer, batch)``: before an optimizer step, with the micro batches it will train
  on (``trainer.state.step`` is the index of that step, 0-based);
- ``post_eval(trainer, metrics)``: after an evaluation, with its metrics;
- ``post_step(trainer, metrics)``: after an optimizer step and the evaluation that followed it,
  if one was due (``trainer.state.step`` now counts that step), with the step's metrics;
- ``rank_saved(trainer, path)``: this rank has written its part of the checkpoint ``path``,
  which is not complete (marked) until every rank has;
- ``post_save(trainer, path, seconds)``: the checkpoint ``path`` is complete on every rank;
- ``at_end(trainer)``: the loop has ended: finished (``trainer.finished``), preempted or stopped.

A callback reads the trainer (``cfg``, ``ctx``, ``run_dir``, ``state``, ``engine``,
``step_module``) and may call ``trainer.request_stop()``; it does not change the step's
numbers. Test-only fault injection is a callback too (:mod:`training.callbacks.faults`), so the
step modules hold no test hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    """Base class: every event does nothing unless overridden. ``trainer`` is the
    :class:`training.trainer.Trainer` that runs the loop."""

    def pre_step(self, trainer: Any, batch: list[Any]) -> None:
        pass

    def post_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        pass

    def post_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        pass

    def rank_saved(self, trainer: Any, path: Path) -> None:
        pass

    def post_save(self, trainer: Any, path: Path, seconds: float) -> None:
        pass

    def at_end(self, trainer: Any) -> None:
        pass
