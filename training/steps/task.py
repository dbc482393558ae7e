"""Fine-tuning: a task head on a pretrained backbone (the task kind comes from the registry).

Data are task features in padded micro batches; the loss is normalised per label over padding,
accumulation steps and ranks; evaluation gives the task metrics on dev; the model directory is
a task model directory (:mod:`model.task_io`). :class:`TaskReport` scores the test split at the
end and writes ``metrics.json`` and ``predictions_test.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.errors import UserError
from crucible.provenance import provenance
from model.compile import compile_blocks
from model.heads import build_head
from model.io import load_model_dir
from model.task_io import save_task_dir
from model.transformer import Transformer
from training.callbacks.base import Callback
from training.collectives import barrier, gather_objects, sum_over_ranks
from training.deepspeed_config import BatchPlan
from training.engine import DistContext, build_engine
from training.optim import build_optimizer, param_groups
from training.steps.base import StepModule, StepOutput
from training.tasks.base import row_outputs
from training.tasks.batches import TaskBatches
from training.tasks.config import FinetuneConfig
from training.tasks.data import TaskData
from training.tasks.features import feature_rows, featurize, find_init_model, load_tokenizer
from training.tasks.labels import label_table
from training.tasks.registry import task_kind

log = logging.getLogger("crucible.training.task")


class TaskStep(StepModule):
    """A task head (``task.kind``) trained on task features; see the module docstring."""

    def __init__(self, cfg: FinetuneConfig, ctx: DistContext, data: TaskData) -> None:
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.task = task_kind(cfg.task)
        self.run_config = cfg
        self.seq_len = cfg.task.max_length
        self.last_dev: dict[str, float] = {}
        if ctx.rank == 0:
            self.log_training_labels()

    def log_training_labels(self) -> None:
        """The training label set with counts (one block), then every label that looks like a
        typo (one warning block; see :mod:`training.tasks.labels`)."""
        counts = self.task.label_counts(self.data.train)
        if not counts:
            return
        source = self.data.sources["train"]
        log.info("%s", label_table(counts, self.data.labels, self.task.label_unit, source))
        warnings = self.task.label_warnings(counts)
        if warnings:
            log.warning("training labels that may be typos (%s):\n  %s", source, "\n  ".join(warnings))

    def prepare(self, plan: BatchPlan) -> TaskBatches:
        self.plan = plan
        self.source_dir = self.tokenizer_dir = find_init_model(self.cfg.init_from)
        self.tokenizer = load_tokenizer(self.source_dir)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.features = featurize(self.data, self.task, self.tokenizer)
        loader = TaskBatches(self.features["train"], self.task, plan.micro_batch_size, plan.grad_accum_steps,
                             self.ctx.rank, self.ctx.world_size, self.cfg.train.seed, self.pad_id)
        self.head = self._build_head()
        self.model_cfg = self.head.cfg
        return loader

    def _build_head(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        backbone, model_cfg = load_model_dir(self.source_dir)
        if self.cfg.init == "random":
            backbone = Transformer(model_cfg)  # same shape and tokenizer, fresh weights
        if model_cfg.max_seq_len < self.cfg.task.max_length:
            raise UserError(
                f"task.max_length ({self.cfg.task.max_length}) exceeds the model's max_seq_len "
                f"({model_cfg.max_seq_len}); set task.max_length <= {model_cfg.max_seq_len}"
            )
        backbone.float()
        return build_head(self.cfg.task.kind, backbone, self.task.num_labels(self.data.labels), self.pad_id,
                          self.cfg.task.problem_type)

    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
        """AdamW with the head's own groups: ``lr_scale`` = task.head_lr_multiplier for the head,
        and a ``backbone`` flag so the first task.freeze_backbone_steps train the head alone."""
        head, optim = self.head, self.cfg.optim
        head_ids = {id(p) for n, p in head.named_parameters() if not n.startswith("model.")}
        groups = []
        for group in param_groups(head, optim):
            for is_head in (False, True):
                params = [p for p in group["params"] if (id(p) in head_ids) == is_head]
                if params:
                    groups.append({**group, "params": params, "backbone": not is_head,
                                   "lr_scale": self.cfg.task.head_lr_multiplier if is_head else 1.0})
        optimizer = build_optimizer(groups, optim, ds_config["zero_optimization"]["stage"])
        if self.cfg.train.compile:
            compile_blocks(head, dynamic=None)  # padded batches vary in length: dynamic after a second shape
        self.engine, self.optimizer = build_engine(head, ds_config, optimizer)
        return self.engine, self.optimizer

    def set_lr(self, step: int, lr: float) -> None:
        frozen = step < self.cfg.task.freeze_backbone_steps
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if (frozen and group.get("backbone")) else lr * group.get("lr_scale", 1.0)

    def train_step(self, batch: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepOutput:
        """The loss is the sum over every label of the global step divided by their global
        count (so padding, uneven micro batches and ranks weigh per label)."""
        device = self.ctx.device
        labels = sum(self.task.label_count(target) for _, target in batch)  # from host targets
        # before any forward: every micro batch needs the global count (kept on the device)
        global_labels = sum_over_ranks(torch.tensor(float(labels), dtype=torch.float64), device)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both
        scale = (len(batch) * self.ctx.world_size / global_labels.clamp(min=1.0)).float()
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for tokens, target in batch:
            loss_sum = self.task.loss(self.engine(tokens.to(device)), target.to(device))
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            loss_total += loss_sum.detach().double()
        real_tokens = sum(int((tokens != self.pad_id).sum()) for tokens, _ in batch)
        return StepOutput(loss_total, float(labels), real_tokens)

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _outputs(self, split: str) -> list[np.ndarray]:
        """Model outputs for every row of ``split`` (all ranks share the work; all get all)."""
        rows = feature_rows(self.features[split])
        mine = list(range(self.ctx.rank, len(rows), self.ctx.world_size))
        micro = self.plan.micro_batch_size
        out: dict[int, np.ndarray] = {}
        self.engine.eval()
        for i in range(0, len(mine), micro):
            idx = mine[i: i + micro]
            tokens, _ = self.task.collate([rows[j] for j in idx], self.pad_id)
            logits = self.engine(tokens.to(self.ctx.device)).float().cpu().numpy()
            out.update(zip(idx, row_outputs(logits, [rows[j] for j in idx])))
        # keep ZeRO-3's collective forward calls aligned: ranks with fewer rows run dummies
        n_batches = math.ceil(math.ceil(len(rows) / self.ctx.world_size) / micro)
        for _ in range(n_batches - math.ceil(len(mine) / micro)):
            self.engine(torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.ctx.device))
        self.engine.train()
        merged = {k: v for part in gather_objects(out, self.ctx.world_size) for k, v in part.items()}
        return [merged[k] for k in range(len(rows))]

    def task_metrics(self, split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics and per-example predictions of ``split``."""
        return self.task.evaluate(self._outputs(split), self.features[split], self.data.split(split),
                                  self.data.labels)

    def evaluate(self) -> dict[str, float]:
        self.last_dev, _ = self.task_metrics("dev")
        return {f"dev/{k}": v for k, v in self.last_dev.items()}

    # --------------------------------------------------------------------------- outputs
    def save_model_dir(self, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        save_task_dir(out, state_dict, self.model_cfg, self.task_record(), tokenizer_dir=self.source_dir,
                      provenance=provenance(self.cfg))

    def task_record(self) -> dict[str, Any]:
        t = self.cfg.task
        return {"kind": t.kind, "labels": self.data.labels, "problem_type": t.problem_type,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.tokenizer.bos_token_id,
                "max_length": t.max_length, "doc_stride": t.doc_stride,
                "max_answer_length": t.max_answer_length, "n_best": t.n_best,
                "format": t.format, "text_column": t.text_column, "text_pair_column": t.text_pair_column,
                "label_column": t.label_column, "columns": t.columns}

    def contamination(self) -> dict[str, Any]:
        from training.tasks.contamination import contamination_report

        manifests = self.cfg.contamination_manifests
        if manifests is None:
            run_cfg = self.source_dir.parent.parent.parent / "config.yaml"
            if run_cfg.is_file():
                import yaml

                manifests = (yaml.safe_load(run_cfg.read_text()) or {}).get("data", {}).get("manifests")
        if not manifests:
            return {"skipped": "no pretraining manifests known (set contamination_manifests)"}
        rows = {split: list(self.features[split]["input_ids"]) for split in ("dev", "test")}
        return contamination_report(rows, manifests, self.cfg.task.contamination_ngram)


class TaskReport(Callback):
    """At the end of a finished fine-tune: test metrics, the last dev metrics, the contamination
    check and the run's data in ``metrics.json``; test predictions in ``predictions_test.jsonl``
    (rank 0). A preempted run reports when it finishes."""

    def at_end(self, trainer: Any) -> None:
        if not trainer.finished:
            return
        step: TaskStep = trainer.step_module
        test, preds = step.task_metrics("test")
        dev = step.last_dev or step.task_metrics("dev")[0]
        if trainer.ctx.rank == 0:
            data = step.data
            record = {"step": trainer.state.step, "dev": dev, "test": test,
                      "contamination": step.contamination(), "init": step.cfg.init,
                      "init_from": str(step.source_dir), "data": data.sources,
                      "examples": {s: len(data.split(s)) for s in ("train", "dev", "test")}}
            (trainer.run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
            with open(trainer.run_dir / "predictions_test.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
            shown = " ".join(f"{k}={v:.4g}" for k, v in test.items())
            log.info("test: %s (metrics.json, predictions_test.jsonl in %s)", shown, trainer.run_dir)
        barrier()
