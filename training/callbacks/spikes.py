"""Loss-spike logging: a warning when the loss jumps above a multiple of its running mean."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from training.callbacks.base import Callback

log = logging.getLogger("crucible.training.spikes")


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


class LossSpikeLogger(Callback):
    """``log.loss_spike_factor``: spikes are logged (with the 0-based step index the
    non-finite-step warnings use), never acted on."""

    def __init__(self, factor: float) -> None:
        self.detector = LossSpikeDetector(factor)

    def post_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.detector.update(trainer.state.step - 1, metrics["train/loss"])
