"""The fine-tune loop: a task head on a pretrained backbone, on the pretraining machinery.

:class:`FinetuneTrainer` reuses the pretraining :class:`~training.pretrain.Trainer` for the
DeepSpeed engine, completion-marked checkpoints, exact resume, preemption signals, NaN/inf step
skipping and metrics; it replaces the data (task features in padded micro batches), the loss
(normalised per label over padding, accumulation steps and ranks), evaluation (task metrics on
dev every ``train.eval_every`` steps, on test at the end) and the model directory (a task model
directory, see :mod:`model.task_io`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from crucible.config import config_to_dict
from crucible.errors import ConfigError, DataError, UserError
from crucible.provenance import provenance
from crucible.runtime import setup_logging
from training import checkpoint as ckpt
from training.deepspeed_config import build_deepspeed_config, check_device_support, resolve_batch
from training.engine import DistContext, init_distributed
from training.optim import SkippingAdamW, lr_at, param_groups
from training.pretrain import (
    EXIT_COLLECTIVE_FAILED,
    Trainer,
    TrainState,
    _is_collective_failure,
    plan_resume,
    write_run_files,
)
from training.tasks import classification, qa, token_classification
from training.tasks.config import FinetuneConfig
from training.tasks.data import TaskData, load_task_data
from training.tasks.losses import IGNORE, head_loss, label_count

log = logging.getLogger("crucible.training.finetune")


# ------------------------------------------------------------------------------ features

def load_tokenizer(model_dir: Path) -> Any:
    """The Hugging Face fast tokenizer saved with the model (offsets need the fast one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"the tokenizer of {model_dir} is not a fast tokenizer (offsets are needed)")
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise DataError(f"the tokenizer of {model_dir} defines no pad or eos token")
    return tok


def featurize(data: TaskData, cfg: FinetuneConfig, tokenizer: Any) -> dict[str, Any]:
    """Token features of every split (``datasets.map``, batched)."""
    task, eos = cfg.task, tokenizer.eos_token_id

    def fn(batch: dict) -> dict:
        if task.kind == "classification":
            return classification.featurize(batch, tokenizer, task, data.labels, eos)
        if task.kind == "token_classification":
            return token_classification.featurize(batch, tokenizer, task.max_length, data.labels)
        return qa.featurize(batch, tokenizer, task.max_length, task.doc_stride, eos)

    out = {}
    for split in ("train", "dev", "test"):
        ds = data.split(split)
        out[split] = ds.map(fn, batched=True, remove_columns=ds.column_names,
                            desc=f"featurize {split}", load_from_cache_file=False)
    return out


def collate(rows: list[dict], kind: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (B, T) and the targets of ``kind``."""
    width = max(len(r["input_ids"]) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    if kind == "classification":
        return tokens, torch.tensor([r["target"] for r in rows], dtype=torch.float32)
    if kind == "token_classification":
        target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            target[i, : len(r["target"])] = torch.tensor(r["target"])
        return tokens, target
    return tokens, torch.tensor([[r["start"], r["end"]] for r in rows], dtype=torch.long)


class TaskBatches:
    """Micro batches of task features for one rank, epoch after epoch.

    The order is a pure function of (seed, epoch): a seeded permutation per epoch. A step
    consumes one global batch (micro x accumulation x ranks) from the permutation; micro step
    ``m`` of rank ``r`` takes the slice ``m * ranks + r``. The state is the global position
    in the epoch (world-size independent); the last partial global batch of an epoch is dropped.
    """

    def __init__(self, features: Any, kind: str, micro_batch_size: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, pad_id: int) -> None:
        self.rows = [dict(zip(features.column_names, values)) for values in zip(
            *(features[c] for c in features.column_names))]
        self.kind, self.pad_id, self.seed = kind, pad_id, seed
        self.micro, self.accum, self.rank, self.world = micro_batch_size, grad_accum, rank, world_size
        self.global_batch = micro_batch_size * grad_accum * world_size
        if len(self.rows) < self.global_batch:
            raise DataError(
                f"the training split has {len(self.rows)} examples (windows), fewer than one global "
                f"batch of {self.global_batch}; lower train.micro_batch_size or train.grad_accum_steps"
            )
        self.epoch, self.position = 0, 0

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm, perm_epoch = None, None
        while True:
            if self.position + self.global_batch > len(self.rows):
                self.epoch, self.position = self.epoch + 1, 0
            if perm_epoch != self.epoch:
                perm, perm_epoch = self._permutation(self.epoch), self.epoch
            start = self.position
            slices = [perm[start + (m * self.world + self.rank) * self.micro:][: self.micro]
                      for m in range(self.accum)]
            self.position += self.global_batch  # the state after this step, before it is yielded
            for idx in slices:
                yield collate([self.rows[i] for i in idx], self.kind, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------------------- trainer

class FinetuneTrainer(Trainer):
    """Fine-tuning on the pretraining machinery (see the module docstring)."""

    def __init__(self, cfg: FinetuneConfig, ctx: DistContext, data: TaskData | None = None) -> None:
        from model.io import find_model_dir

        self._init_runtime(cfg, ctx)
        self.source_dir = find_model_dir(cfg.init_from)
        self.tokenizer = load_tokenizer(self.source_dir)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.data = data if data is not None else load_task_data(cfg.task)
        self.features = featurize(self.data, cfg, self.tokenizer)
        self.plan = resolve_batch(cfg.train, ctx.world_size)
        self.loader = TaskBatches(self.features["train"], cfg.task.kind, self.plan.micro_batch_size,
                                  self.plan.grad_accum_steps, ctx.rank, ctx.world_size, cfg.train.seed,
                                  self.pad_id)
        self.seq_len = cfg.task.max_length
        head = self._build_head()
        self.model_cfg = head.cfg
        self.resolved = cfg
        self.tok_sha = None
        self.tok_dir = self.source_dir
        self.resume_from, universal = plan_resume(cfg, ctx)
        if self.resume_from is not None:
            ckpt.check_compatible(ckpt.read_trainer_state(self.resume_from.path),
                                  config_to_dict(self.model_cfg), None)
        self.ds_config = build_deepspeed_config(cfg.train, cfg.optim, ctx.world_size, load_universal=universal)
        if ctx.rank == 0:
            write_run_files(self.run_dir, cfg, self.ds_config, self.source_dir)
        self.engine, self.optimizer = self._build_engine(head)
        self.state = TrainState()
        if self.resume_from is not None:
            self._restore(self.resume_from, universal)
        self._init_metrics()
        self.last_dev: dict[str, float] = {}

    # ---------------------------------------------------------------------------- build
    def _build_head(self) -> torch.nn.Module:
        from model.heads import build_head
        from model.io import load_model_dir
        from model.transformer import Transformer

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
        num_labels = len(self.data.labels) if self.data.labels else 1
        return build_head(self.cfg.task.kind, backbone, num_labels, self.pad_id, self.cfg.task.problem_type)

    def _build_engine(self, head: torch.nn.Module) -> tuple[Any, torch.optim.Optimizer]:
        """AdamW with the head's own groups: ``lr_scale`` = task.head_lr_multiplier for the head,
        and a ``backbone`` flag so the first task.freeze_backbone_steps train the head alone."""
        import deepspeed

        groups = []
        for group in param_groups(head, self.cfg.optim):
            ids_head = {id(p) for n, p in head.named_parameters() if not n.startswith("model.")}
            for is_head in (False, True):
                params = [p for p in group["params"] if (id(p) in ids_head) == is_head]
                if params:
                    groups.append({**group, "params": params, "backbone": not is_head,
                                   "lr_scale": self.cfg.task.head_lr_multiplier if is_head else 1.0})
        optim = self.cfg.optim
        optimizer = SkippingAdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay, foreach=True,
                                  clip_grad=optim.grad_clip if self.cfg.train.zero_stage == 0 else None)
        engine, _, _, _ = deepspeed.initialize(model=head, optimizer=optimizer, config=self.ds_config)
        return engine, optimizer

    # ----------------------------------------------------------------------- the loop
    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.optim.lr, self.cfg.schedule, self.cfg.train.max_steps)
        frozen = step < self.cfg.task.freeze_backbone_steps
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if (frozen and group.get("backbone")) else lr * group.get("lr_scale", 1.0)
        return lr

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step; the loss is the sum over every label of the global step divided
        by their global count (so padding, uneven micro batches and ranks weigh per label)."""
        step = self.state.step
        self.faults.maybe_hang(step, self.ctx.rank)
        lr = self._set_lr(step)
        self.optimizer.last_step_skipped = False
        start = time.perf_counter()
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(self.plan.grad_accum_steps)]
        data_wait = time.perf_counter() - t0
        kind, problem = self.cfg.task.kind, self.cfg.task.problem_type
        # [labels, stop flag, real tokens] over the whole global step, before any forward
        counts = torch.tensor([float(sum(label_count(kind, t, problem) for _, t in micro)),
                               float(self.preempt.is_set),
                               float(sum(int((x != self.pad_id).sum()) for x, _ in micro))],
                              dtype=torch.float64)
        dist.all_reduce(counts)
        global_labels = max(counts[0].item(), 1.0)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both
        scale = self.plan.grad_accum_steps * self.ctx.world_size / global_labels
        device = self.ctx.device
        loss_total = 0.0
        for tokens, target in micro:
            loss_sum, _ = head_loss(kind, self.engine(tokens.to(device)), target.to(device), problem)
            if self.faults.nan_now(step, self.ctx.rank):
                loss_sum = loss_sum * float("nan")
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            loss_total += float(loss_sum.detach())
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        total = torch.tensor([loss_total], dtype=torch.float64)
        dist.all_reduce(total)
        mean_loss = total.item() / global_labels
        skipped = bool(getattr(self.optimizer, "last_step_skipped", False)) or not self.engine.was_step_applied()
        return self._finish_step(step, lr, mean_loss, grad_norm, skipped, int(counts[2].item()),
                                 time.perf_counter() - start, data_wait, stop=counts[1].item() > 0)

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _outputs(self, split: str) -> list[np.ndarray]:
        """Model outputs for every row of ``split`` (all ranks share the work; all get all)."""
        feats = self.features[split]
        rows = [dict(zip(feats.column_names, v)) for v in zip(*(feats[c] for c in feats.column_names))]
        mine = list(range(self.ctx.rank, len(rows), self.ctx.world_size))
        out: dict[int, np.ndarray] = {}
        self.engine.eval()
        for i in range(0, len(mine), self.plan.micro_batch_size):
            idx = mine[i: i + self.plan.micro_batch_size]
            tokens, _ = collate([rows[j] for j in idx], self.cfg.task.kind, self.pad_id)
            logits = self.engine(tokens.to(self.ctx.device)).float().cpu().numpy()
            for j, k in enumerate(idx):
                out[k] = logits[j][: len(rows[k]["input_ids"])] if logits.ndim == 3 else logits[j]
        # keep ZeRO-3's collective forward calls aligned: ranks with fewer rows run dummies
        n_batches = math.ceil(math.ceil(len(rows) / self.ctx.world_size) / self.plan.micro_batch_size)
        for _ in range(n_batches - math.ceil(len(mine) / self.plan.micro_batch_size)):
            self.engine(torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.ctx.device))
        self.engine.train()
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, out)
        merged = {k: v for part in gathered for k, v in part.items()}
        return [merged[k] for k in range(len(rows))]

    def task_metrics(self, split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics and per-example predictions of ``split``."""
        task, feats, labels = self.cfg.task, self.features[split], self.data.labels
        outputs = self._outputs(split)
        examples = self.data.split(split)
        if task.kind == "classification":
            logits = np.stack(outputs)
            targets = np.asarray(feats["target"], dtype=np.float32)
            metrics = classification.compute_metrics(logits, targets, task, labels)
            if task.problem_type == "single_label":
                metrics["majority_rate"] = classification.majority_rate(targets)
                preds = [{"text": ex["text"], "label": ex["label"], "prediction": labels[int(p)]}
                         for ex, p in zip(examples, logits.argmax(-1))]
            else:
                preds = [{"text": ex["text"], "label": ex["label"], "output": o.tolist()}
                         for ex, o in zip(examples, logits)]
            return metrics, preds
        if task.kind == "token_classification":
            pred_tags = [token_classification.words_from_predictions(o.argmax(-1).tolist(), wi, labels)
                         for o, wi in zip(outputs, feats["word_index"])]
            gold = examples["tags"]
            metrics = token_classification.compute_metrics(gold, pred_tags)
            metrics["truncated_words"] = float(sum(feats["truncated_words"]))
            preds = [{"tokens": ex["tokens"], "tags": ex["tags"], "prediction": p}
                     for ex, p in zip(examples, pred_tags)]
            return metrics, preds
        contexts = {ex["id"]: ex["context"] for ex in examples}
        answers = qa.decode_answers([o[:, 0] for o in outputs], [o[:, 1] for o in outputs], feats,
                                    contexts, task.n_best, task.max_answer_length)
        refs = {ex["id"]: ex["answers"]["text"] for ex in examples}
        metrics = qa.compute_metrics(answers, refs)
        aligned = {f for f, ok in zip(feats["example_id"], feats["answer_aligned"]) if ok}
        metrics["answers_not_on_token_boundaries"] = float(len(refs) - len(aligned & set(refs)))
        preds = [{"id": k, "prediction": answers.get(k, ""), "answers": v} for k, v in refs.items()]
        return metrics, preds

    def evaluate(self) -> dict[str, float] | None:
        metrics, _ = self.task_metrics("dev")
        self.last_dev = metrics
        return {f"dev/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------------ outputs
    def _write_model_dir(self, path: Path) -> None:
        from model.task_io import save_task_dir

        if self.cfg.train.zero_stage == 0:
            state = {k: v.float() for k, v in self.engine.module.state_dict().items()}
        else:
            state = ckpt.consolidated_fp32_state_dict(path)
        save_task_dir(path / ckpt.MODEL_DIR, state, self.model_cfg, self.task_record(),
                      tokenizer_dir=self.source_dir, provenance=provenance(self.cfg))

    def task_record(self) -> dict[str, Any]:
        t = self.cfg.task
        return {"kind": t.kind, "labels": self.data.labels, "problem_type": t.problem_type,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.tokenizer.bos_token_id,
                "max_length": t.max_length, "doc_stride": t.doc_stride,
                "max_answer_length": t.max_answer_length, "n_best": t.n_best,
                "format": t.format, "text_column": t.text_column, "text_pair_column": t.text_pair_column,
                "label_column": t.label_column, "columns": t.columns}

    def contamination(self) -> dict[str, Any] | None:
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

    def run(self) -> int:
        status = super().run()
        if not self._done():
            return status  # preempted: test evaluation happens when the run finishes
        test, preds = self.task_metrics("test")
        dev = self.last_dev or self.task_metrics("dev")[0]
        if self.ctx.rank == 0:
            record = {"step": self.state.step, "dev": dev, "test": test,
                      "contamination": self.contamination(), "init": self.cfg.init,
                      "init_from": str(self.source_dir), "data": self.data.sources,
                      "examples": {s: len(self.data.split(s)) for s in ("train", "dev", "test")}}
            (self.run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
            with open(self.run_dir / "predictions_test.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
            shown = " ".join(f"{k}={v:.4g}" for k, v in test.items())
            log.info("test: %s (metrics.json, predictions_test.jsonl in %s)", shown, self.run_dir)
        dist.barrier()
        return status


def finetune(cfg: FinetuneConfig) -> int:
    if not cfg.init_from:
        raise ConfigError(
            "init_from is not set: give the pretraining run directory (or a model directory or "
            "Hugging Face Llama directory) to fine-tune, e.g. init_from=runs/demo/pretrain"
        )
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    data = load_task_data(cfg.task)  # bad data fails here, before any process group exists
    ctx = init_distributed(cfg.train)
    run_dir = Path(cfg.run_dir)
    setup_logging(cfg.log.level, rank=ctx.rank, all_ranks=cfg.log.all_ranks,
                  rank_log_dir=run_dir / "logs" if cfg.log.rank_files else None)
    check_device_support(cfg.train, ctx.device.type)
    trainer = FinetuneTrainer(cfg, ctx, data)
    try:
        return trainer.run()
    except RuntimeError as exc:
        if not _is_collective_failure(exc):
            raise
        log.error("a collective operation failed (a rank died or hung): %s; exiting",
                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        logging.shutdown()
        os._exit(EXIT_COLLECTIVE_FAILED)
    finally:
        trainer.preempt.uninstall()
