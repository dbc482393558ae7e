"""Metrics writing: ``metrics.jsonl``, TensorBoard scalars and the console line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from training.callbacks.base import Callback

log = logging.getLogger("crucible.training.metrics")


class TensorBoardWriter:
    """TensorBoard scalars, created on first use (a run that fails in set-up leaves no event file)."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.log_dir, self.enabled = log_dir, enabled
        self._writer: Any = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MetricsLogger(Callback):
    """One record per step in ``<run_dir>/metrics.jsonl`` (rank 0, full precision), TensorBoard
    scalars (rank 0, ``log.tensorboard``) and a console line, every ``log.every`` steps and at
    step 1 and with every validation loss.

    An evaluation's metrics join the record of the step it followed; one after the last step
    (the final evaluation) gets a record of its own.
    """

    def __init__(self, run_dir: Path, rank: int, every: int, tensorboard: bool) -> None:
        self.jsonl = Path(run_dir) / "metrics.jsonl" if rank == 0 else None
        self.every = every
        self.tensorboard = TensorBoardWriter(Path(run_dir) / "tensorboard", rank == 0 and tensorboard)
        self.pending: dict[str, float] = {}

    def post_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.pending.update(metrics)

    def post_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._write(trainer, {**metrics, **self.pending})
        self.pending = {}

    def post_save(self, trainer: Any, path: Path, seconds: float) -> None:
        self.tensorboard.scalars(trainer.state.step, {"checkpoint/save_seconds": seconds})

    def at_end(self, trainer: Any) -> None:
        if self.pending:
            self._write(trainer, self.pending)
            self.pending = {}
        self.tensorboard.close()

    def _write(self, trainer: Any, scalars: dict[str, float]) -> None:
        step = trainer.state.step
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "consumed_samples": trainer.state.consumed_samples,
                                    **scalars}) + "\n")
        if step % self.every == 0 or step == 1 or "val/loss" in scalars or "val_full/loss" in scalars:
            self.tensorboard.scalars(step, scalars)
            shown = " ".join(f"{k.removeprefix('train/').replace('/', '_')}={v:.4g}" for k, v in scalars.items())
            log.info("step %d %s", step, shown)
