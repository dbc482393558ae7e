"""Fault handling: preemption signals, the non-finite step policy, loss spikes, test faults.

Preemption: SIGTERM / SIGINT only set a flag; the trainer all-reduces it at the next step
boundary (max over ranks), so a signal that reached a single rank still stops every rank at the
same step, which then saves a checkpoint and exits 0.

Dead or hung ranks: the process group is created with ``train.collective_timeout_s``; a
collective whose peer died fails at once (connection closed) and one whose peer hangs fails
after the timeout, so the survivors exit non-zero instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
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


@dataclass
class LossSpikeDetector:
    """Warns when the loss exceeds ``factor`` x its exponential moving average."""

    factor: float
    beta: float = 0.9
    warmup: int = 10
    mean: float | None = None
    seen: int = 0
    spikes: list[int] = field(default_factory=list)

    def update(self, step: int, loss: float) -> bool:
        if loss != loss or loss in (float("inf"), float("-inf")):
            return False
        spike = self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean
        if spike:
            self.spikes.append(step)
            log.warning("step %d: loss spike %.4f > %.1f x running mean %.4f", step, loss,
                        self.factor, self.mean)
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1
        return spike


@dataclass(frozen=True)
class FaultInjection:
    """Test-only faults, read from environment variables (never from the config).

    ``CRUCIBLE_FAULT_NAN_STEPS``: comma-separated steps whose loss becomes NaN on
    ``CRUCIBLE_FAULT_NAN_RANK`` (default 0); ``CRUCIBLE_FAULT_KILL_IN_SAVE``: the rank
    ``CRUCIBLE_FAULT_KILL_RANK`` (default 1) SIGKILLs itself after writing its part of the
    checkpoint of that step, before the completion marker; ``CRUCIBLE_FAULT_HANG_STEP``: rank
    ``CRUCIBLE_FAULT_KILL_RANK`` sleeps forever before that step (a hung rank);
    ``CRUCIBLE_FAULT_STEP_SLEEP``: seconds every rank sleeps per step (so a test can signal a
    run mid-flight); ``CRUCIBLE_RECORD_SAMPLES=1``: every rank appends the sha1 of each sample it
    trains on to ``<run_dir>/samples/rank<R>.jsonl`` (audits of the data order).
    """

    nan_steps: frozenset[int] = frozenset()
    nan_rank: int = 0
    kill_in_save_step: int | None = None
    hang_step: int | None = None
    fault_rank: int = 1
    step_sleep: float = 0.0
    record_samples: bool = False

    @classmethod
    def from_env(cls) -> "FaultInjection":
        env = os.environ

        def _int(name: str) -> int | None:
            return int(env[name]) if env.get(name) else None

        steps = env.get("CRUCIBLE_FAULT_NAN_STEPS", "")
        return cls(
            nan_steps=frozenset(int(s) for s in steps.split(",") if s.strip()),
            nan_rank=_int("CRUCIBLE_FAULT_NAN_RANK") or 0,
            kill_in_save_step=_int("CRUCIBLE_FAULT_KILL_IN_SAVE"),
            hang_step=_int("CRUCIBLE_FAULT_HANG_STEP"),
            fault_rank=_int("CRUCIBLE_FAULT_KILL_RANK") if env.get("CRUCIBLE_FAULT_KILL_RANK") else 1,
            step_sleep=float(env.get("CRUCIBLE_FAULT_STEP_SLEEP") or 0.0),
            record_samples=env.get("CRUCIBLE_RECORD_SAMPLES", "") not in ("", "0"),
        )

    def nan_now(self, step: int, rank: int) -> bool:
        return step in self.nan_steps and rank == self.nan_rank

    def maybe_kill_in_save(self, step: int, rank: int) -> None:
        if self.kill_in_save_step == step and rank == self.fault_rank:
            log.warning("fault injection: SIGKILL rank %d during the save of step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_hang(self, step: int, rank: int) -> None:
        import time

        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.hang_step == step and rank == self.fault_rank:
            log.warning("fault injection: rank %d hangs before step %d", rank, step)
            while True:
                time.sleep(3600)
