"""Fault handling of the loop: preemption signals and the non-finite step policy (loss-spike
logging and test-only fault injection are callbacks, see :mod:`training.callbacks`).

Preemption: SIGTERM / SIGINT only set a flag; the trainer all-reduces it at the next step
boundary (max over ranks), so a signal that reached a single rank still stops every rank at the
same step, which then saves a checkpoint and exits 0.

Dead or hung ranks: the process group is created with ``train.collective_timeout_s``; a
collective whose peer died fails at once (connection closed) and one whose peer hangs fails
after the timeout, so the survivors exit non-zero instead of waiting forever.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from types import FrameType

from crucible.errors import UserError

log = logging.getLogger("crucible.training.faults")


class TrainingDiverged(UserError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class PreemptionFlag:
    """Set by SIGTERM/SIGINT; the trainer checks it at every step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> "PreemptionFlag":
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: saving a checkpoint at the next step boundary", self.signal_name)

    @property
    def is_set(self) -> bool:
        return self.signal_name is not None


@dataclass
class BadStepPolicy:
    """Counts skipped (non-finite) steps and stops after ``max_consecutive`` in a row."""

    max_consecutive: int
    total_skipped: int = 0
    consecutive: int = 0

    def record(self, step: int, skipped: bool, loss: float, grad_norm: float | None) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.total_skipped += 1
        self.consecutive += 1
        log.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s): optimizer step skipped on every "
            "rank (%d in a row, %d in total)", step, loss, grad_norm, self.consecutive,
            self.total_skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive steps up to step {step} had a "
                f"non-finite loss or gradient norm (train.max_bad_steps={self.max_consecutive}); "
                "resume from an earlier checkpoint with a lower optim.lr, more schedule.warmup_steps "
                "or a smaller optim.grad_clip"
            )
