"""Pretraining: the language-modelling step module on the training loop (``launcher/pretrain.py``)."""

from __future__ import annotations

from crucible.errors import UserError
from training.config import PretrainConfig
from training.dry_run import dry_run_report
from training.steps.language_model import LanguageModelStep
from training.steps.pipeline import PipelineLanguageModelStep
from training.trainer import run_training


def pretrain(cfg: PretrainConfig, dry_run: bool = False, world_size: int | None = None,
             write_gbps: float | None = None) -> int:
    """Run (or with ``dry_run`` only check, planning for ``world_size`` GPUs and timing a
    checkpoint save at ``write_gbps`` GB/s per rank) pretraining."""
    if write_gbps is not None and not write_gbps > 0:
        raise UserError(f"--write-gbps must be a positive bandwidth in GB/s (got {write_gbps})")
    if dry_run:
        return dry_run_report(cfg, world_size, **({"write_gbps": write_gbps} if write_gbps else {}))
    step = PipelineLanguageModelStep if cfg.train.pipeline_stages > 1 else LanguageModelStep
    return run_training(cfg, lambda ctx: step(cfg, ctx))
