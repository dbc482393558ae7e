"""Fine-tuning: the task step module on the training loop (``launcher/finetune.py``)."""

from __future__ import annotations

from crucible.errors import ConfigError
from training.steps.task import TaskReport, TaskStep
from training.tasks.config import FinetuneConfig
from training.tasks.data import load_task_data
from training.trainer import default_callbacks, run_training


def finetune(cfg: FinetuneConfig) -> int:
    """Train ``cfg.task`` on the backbone of ``cfg.init_from``; test metrics at the end."""
    if not cfg.init_from:
        raise ConfigError(
            "init_from is not set: give the pretraining run directory (or a model directory or "
            "Hugging Face Llama directory) to fine-tune, e.g. init_from=runs/demo/pretrain"
        )
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    data = load_task_data(cfg.task)  # bad data fails here, before any process group exists
    return run_training(cfg, lambda ctx: TaskStep(cfg, ctx, data),
                        callbacks=lambda ctx: [*default_callbacks(cfg, ctx), TaskReport()])
