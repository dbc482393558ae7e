"""Pretraining: the language-modelling step module on the training loop (``launcher/pretrain.py``)."""

from __future__ import annotations

from training.config import PretrainConfig
from training.dry_run import dry_run_report
from training.steps.language_model import LanguageModelStep
from training.trainer import run_training


def pretrain(cfg: PretrainConfig, dry_run: bool = False, world_size: int | None = None) -> int:
    """Run (or with ``dry_run`` only check, planning for ``world_size`` GPUs) pretraining."""
    if dry_run:
        return dry_run_report(cfg, world_size)
    return run_training(cfg, lambda ctx: LanguageModelStep(cfg, ctx))
