"""Learning-rate schedules: objects the training loop asks for the rate of each optimizer step.

A schedule is a pure function of the step (0-based), so resuming needs no scheduler state. The
recipes use :func:`configured_schedule`: :class:`ConfiguredSchedule` (section ``schedule``), or
with data phases that declare LR segments a :class:`PhasedSchedule`; the LR range test passes an
:class:`ExponentialSchedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from data_pipeline.loader.config import PhaseSchedule
from data_pipeline.loader.phases import phase_at, phase_start_steps
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


@dataclass(frozen=True)
class PhasedSchedule:
    """The recipe's schedule (segment 0, over the whole run) followed by the LR segments of the
    data phases that declare one (``data.phases[k].schedule``).

    Segment ``k`` covers its phase's steps up to the next phase that declares a segment (else the
    run's last step ``total_steps - 1``). It goes from its start LR (``start_lr_ratio x peak``, or
    the LR the schedule before it has at the phase's first step) to ``min_lr_ratio x peak`` at its
    last step: linearly, along a half cosine, or not at all (constant). A phase without a segment
    leaves the LR to the segment before it.
    """

    peak_lr: float
    schedule: ScheduleConfig
    total_steps: int
    starts: tuple[int, ...]
    """First step of every data phase, phase 0's (0) included."""
    segments: tuple[PhaseSchedule | None, ...]
    """One per phase; phase 0's is None (the recipe's schedule)."""

    def __call__(self, step: int) -> float:
        return self._lr(phase_at(list(self.starts), step), step)

    def _lr(self, phase: int, step: int) -> float:
        """LR of ``step`` under the segments of phases ``0..phase``."""
        while phase > 0 and self.segments[phase] is None:
            phase -= 1
        if phase == 0:
            return lr_at(step, self.peak_lr, self.schedule, self.total_steps)
        seg = self.segments[phase]
        first = self.starts[phase]
        later = [self.starts[k] for k in range(phase + 1, len(self.starts)) if self.segments[k] is not None]
        last = (later[0] if later else self.total_steps) - 1
        start_lr = (self._lr(phase - 1, first) if seg.start_lr_ratio is None
                    else seg.start_lr_ratio * self.peak_lr)
        end_lr = seg.min_lr_ratio * self.peak_lr
        if seg.kind == "constant":
            return start_lr
        progress = min(max((step - first) / max(last - first, 1), 0.0), 1.0)
        if seg.kind == "cosine":
            return end_lr + (start_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return start_lr + (end_lr - start_lr) * progress


def configured_schedule(cfg: Any, tokens_per_step: int) -> LRSchedule:
    """The schedule of a recipe (``optim.lr``, ``schedule``, ``train.max_steps``): with data phases
    that declare LR segments (``data.phases[k].schedule``) a :class:`PhasedSchedule` whose phases
    start where the loader switches (``tokens_per_step`` resolves ``start_tokens``)."""
    phases = getattr(getattr(cfg, "data", None), "phases", None) or []
    if not any(p.schedule is not None for p in phases):
        return ConfiguredSchedule(cfg.optim.lr, cfg.schedule, cfg.train.max_steps)
    starts = phase_start_steps(cfg.data, tokens_per_step, cfg.train.max_steps)
    return PhasedSchedule(cfg.optim.lr, cfg.schedule, cfg.train.max_steps, tuple(starts),
                          (None, *(p.schedule for p in phases)))
