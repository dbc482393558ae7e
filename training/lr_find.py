"""Learning-rate range test: train with an exponentially growing learning rate, record the
loss, suggest a learning rate and plot loss against learning rate.

This is the "LR range test" of Smith (2017), as popularised by fastai: the suggestion is a tenth
of the learning rate where the smoothed loss is lowest (before it diverges to four times its
minimum); the steepest descent is reported too. It is the fine-tune step module on the training
loop with an exponential schedule, so it sees exactly the data, head, batch and ZeRO setup of
the recipe it is given; nothing is checkpointed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from crucible.errors import ConfigError
from training.callbacks.base import Callback
from training.callbacks.faults import FaultInjection
from training.collectives import barrier
from training.schedule import ExponentialSchedule
from training.steps.task import TaskStep
from training.tasks.config import FinetuneConfig
from training.tasks.data import load_task_data
from training.trainer import run_training

log = logging.getLogger("crucible.training.lr_find")


def suggest_lr(lrs: list[float], losses: list[float], smoothing: float = 0.9) -> dict[str, Any]:
    """Smoothed losses (bias-corrected EMA), the divergence cut-off and the suggested LR.

    The suggestion is a tenth of the learning rate at the smoothed minimum (robust to noisy
    curves); the steepest descent before that minimum is reported beside it.
    """
    smoothed, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = smoothing * avg + (1 - smoothing) * loss
        smoothed.append(avg / (1 - smoothing ** (i + 1)))
    best = min(smoothed)
    cut = next((i for i, s in enumerate(smoothed) if s > 4 * best and i > 0), len(smoothed))
    y = np.asarray(smoothed[:cut])
    i_min = int(np.argmin(y))
    result: dict[str, Any] = {"smoothed": smoothed, "cutoff": cut, "min_loss_lr": float(lrs[i_min]),
                              "suggested_lr": float(lrs[i_min]) / 10, "steepest_lr": None}
    if i_min >= 3:
        slope = np.gradient(y[: i_min + 1], np.log10(np.asarray(lrs[: i_min + 1])))
        result["steepest_lr"] = float(lrs[int(np.argmin(slope))])
    return result


def plot(lrs: list[float], losses: list[float], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, alpha=0.35, label="loss")
    ax.plot(lrs, result["smoothed"], label="smoothed")
    ax.axvline(result["suggested_lr"], color="red", linestyle="--",
               label=f"suggested {result['suggested_lr']:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in result["smoothed"][: result["cutoff"]] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, max(finite[0] * 1.3, min(finite) * 1.5))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class LRRangeTest(Callback):
    """Records (learning rate, loss) per step, stops once the loss diverges (non-finite, or 8x
    its best), and at the end writes ``lr_find.json`` and ``lr_find.png`` (rank 0)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.best = math.inf

    def post_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        loss = metrics["train/loss"]
        self.lrs.append(metrics["train/lr"])
        self.losses.append(loss)
        self.best = min(self.best, loss)
        if not math.isfinite(loss) or loss > 8 * self.best:
            trainer.request_stop()  # the loss is all-reduced: every rank stops at the same step

    def at_end(self, trainer: Any) -> None:
        if trainer.ctx.rank == 0:
            out = trainer.run_dir
            out.mkdir(parents=True, exist_ok=True)
            result = suggest_lr(self.lrs, self.losses)
            plot(self.lrs, self.losses, result, out / "lr_find.png")
            record = {"suggested_lr": result["suggested_lr"], "min_loss_lr": result["min_loss_lr"],
                      "steepest_lr": result["steepest_lr"],
                      "lrs": self.lrs, "losses": self.losses, "smoothed": result["smoothed"]}
            (out / "lr_find.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"suggested learning rate: {result['suggested_lr']:.3g} "
                  f"(plot: {out / 'lr_find.png'}; set optim.lr={result['suggested_lr']:.3g})")
        barrier()


def lr_find(cfg: FinetuneConfig, start_lr: float, end_lr: float, steps: int) -> int:
    """The recipe's fine-tune step module under an exponential schedule from ``start_lr`` to
    ``end_lr`` over ``steps`` steps, in ``<run_dir>/lr_find``; no checkpoint, no evaluation."""
    if not cfg.init_from:
        raise ConfigError("init_from is not set: give the pretraining run or model directory")
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"--start-lr ({start_lr}) must be positive and below --end-lr ({end_lr})")
    import datasets

    datasets.disable_progress_bars()
    cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"max_steps": steps, "eval_every": 0}),
        "task": cfg.task.model_copy(update={"freeze_backbone_steps": 0}),
        "log": cfg.log.model_copy(update={"tensorboard": False}),
        "run_dir": str(Path(cfg.run_dir) / "lr_find"),
    })
    data = load_task_data(cfg.task)
    faults = FaultInjection.from_env()
    return run_training(cfg, lambda ctx: TaskStep(cfg, ctx, data),
                        callbacks=lambda ctx: [LRRangeTest(), *([faults] if faults else [])],
                        schedule=ExponentialSchedule(start_lr, end_lr, steps), checkpoints=False, evaluate=False)
