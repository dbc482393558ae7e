"""Learning-rate schedules: objects the training loop asks for the rate of each optimizer step.

A schedule is a pure function of the step (0-based), so resuming needs no scheduler state. The
recipes use :class:`ConfiguredSchedule` (section ``schedule``); the LR range test passes an
:class:`ExponentialSchedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from training.config import ScheduleConfig


class LRSchedule(Protocol):
    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""


def lr_at(step: int, peak_lr: float, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from ``peak/warmup`` to ``peak`` over ``warmup_steps``, then:
    ``cosine`` / ``linear`` decay to ``min_lr_ratio * peak`` at the last step; ``wsd`` holds the
    peak and decays linearly over the last ``decay_fraction`` of the post-warmup steps;
    ``constant`` holds the peak.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    min_lr = peak_lr * schedule.min_lr_ratio
    if schedule.kind == "constant":
        return peak_lr
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if schedule.kind == "cosine":
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.kind == "linear":
        return peak_lr + (min_lr - peak_lr) * progress
    # wsd: stable until the decay phase, then linear to min_lr
    decay_start = 1.0 - schedule.decay_fraction
    if progress <= decay_start:
        return peak_lr
    return peak_lr + (min_lr - peak_lr) * (progress - decay_start) / schedule.decay_fraction


@dataclass(frozen=True)
class ConfiguredSchedule:
    """The recipe's schedule: warmup, then ``schedule.kind`` down to ``min_lr_ratio x peak``."""

    peak_lr: float
    schedule: ScheduleConfig
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.schedule, self.total_steps)


@dataclass(frozen=True)
class ExponentialSchedule:
    """``start`` at step 0, growing by a constant factor to ``end`` at step ``steps - 1``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        ratio = (self.end / self.start) ** (1 / max(self.steps - 1, 1))
        return self.start * ratio ** step
