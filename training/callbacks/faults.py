"""Test-only fault injection, as a callback: read from environment variables, never from the
config, and absent from a run unless one of them is set.

``CRUCIBLE_FAULT_NAN_STEPS``: comma-separated steps (0-based) whose loss becomes NaN on rank
``CRUCIBLE_FAULT_NAN_RANK`` (default 0; the model's output is multiplied by NaN during the step);
``CRUCIBLE_FAULT_KILL_IN_SAVE``: rank ``CRUCIBLE_FAULT_KILL_RANK`` (default 1) SIGKILLs itself
after writing its part of the checkpoint of that step, before the completion marker;
``CRUCIBLE_FAULT_HANG_STEP``: rank ``CRUCIBLE_FAULT_KILL_RANK`` sleeps forever before that step (a
hung rank); ``CRUCIBLE_FAULT_STEP_SLEEP``: seconds every rank sleeps per step (so a test can
signal a run mid-flight); ``CRUCIBLE_RECORD_SAMPLES=1``: every rank appends the sha1 of each
sample it trains on to ``<run_dir>/samples/rank<R>.jsonl`` (audits of the data order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.callbacks.base import Callback

log = logging.getLogger("crucible.training.faults")

VARIABLES = ("CRUCIBLE_FAULT_NAN_STEPS", "CRUCIBLE_FAULT_NAN_RANK", "CRUCIBLE_FAULT_KILL_IN_SAVE",
             "CRUCIBLE_FAULT_HANG_STEP", "CRUCIBLE_FAULT_KILL_RANK", "CRUCIBLE_FAULT_STEP_SLEEP",
             "CRUCIBLE_RECORD_SAMPLES")


@dataclass
class FaultInjection(Callback):
    """The faults a test asked for (see the module docstring)."""

    nan_steps: frozenset[int] = frozenset()
    nan_rank: int = 0
    kill_in_save_step: int | None = None
    hang_step: int | None = None
    fault_rank: int = 1
    step_sleep: float = 0.0
    record_samples: bool = False
    nan_hook: Any = field(default=None, init=False, repr=False, compare=False)
    """The NaN forward hook armed for the current step."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FaultInjection | None:
        """The faults set in ``env``, or None when no fault variable is set."""
        if not any(env.get(name) for name in VARIABLES):
            return None

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

    def pre_step(self, trainer: Any, batch: list[Any]) -> None:
        step, rank = trainer.state.step, trainer.ctx.rank
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.hang_step == step and rank == self.fault_rank:
            log.warning("fault injection: rank %d hangs before step %d", rank, step)
            while True:
                time.sleep(3600)
        if self.record_samples:
            append_sample_hashes(trainer.run_dir, rank, step, batch)
        if step in self.nan_steps and rank == self.nan_rank:
            self.nan_hook = trainer.engine.module.register_forward_hook(_nan_output)

    def post_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.nan_hook is not None:
            self.nan_hook.remove()
            self.nan_hook = None

    def rank_saved(self, trainer: Any, path: Path) -> None:
        rank = trainer.ctx.rank
        if self.kill_in_save_step == trainer.state.step and rank == self.fault_rank:
            log.warning("fault injection: SIGKILL rank %d during the save of step %d", rank, trainer.state.step)
            os.kill(os.getpid(), signal.SIGKILL)


def _nan_output(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    """Training forward passes only: an evaluation that follows the step stays finite. A tuple
    (a pipeline stage's hidden states with the token ids beside them) gets NaN in its first part."""
    if not module.training:
        return output
    if isinstance(output, tuple):
        return (output[0] * float("nan"), *output[1:])
    return output * float("nan")


def append_sample_hashes(run_dir: Path, rank: int, step: int, batch: list[Any]) -> None:
    """Append the sha1 of every sample of each micro batch (one line per micro batch)."""
    out = Path(run_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
        for micro in batch:
            tokens = micro[0] if isinstance(micro, (tuple, list)) else micro
            hashes = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in tokens.cpu()]
            f.write(json.dumps({"step": step, "samples": hashes}) + "\n")
