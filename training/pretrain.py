"""The pretraining loop: DeepSpeed ZeRO engine, streaming token shards, exact resume,
completion-marked checkpoints, metrics, preemption and non-finite-step handling.

Entry: :func:`pretrain` (``launcher/pretrain.py``). Works under the deepspeed launcher, torchrun,
Slurm, as one plain python process, and inside an already initialised gloo process group
(tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from crucible.config import config_to_dict
from crucible.errors import DataError, UserError
from crucible.provenance import provenance, write_provenance
from crucible.runtime import env_rank, env_world_size, setup_logging
from model.config import ModelConfig, resolve_model_config
from training import checkpoint as ckpt
from training.config import PretrainConfig
from training.deepspeed_config import (
    build_deepspeed_config,
    check_device_support,
    estimate_memory_per_gpu,
    resolve_batch,
    save_deepspeed_config,
)
from training.engine import DistContext, build_engine, build_model, init_distributed
from training.faults import BadStepPolicy, FaultInjection, LossSpikeDetector, PreemptionFlag
from training.metrics import (
    MetricsWriter,
    device_peak_tflops,
    mfu,
    model_state_bytes,
    peak_memory_gb,
)
from training.optim import lr_at, set_lr

log = logging.getLogger("crucible.training.pretrain")

EXIT_COLLECTIVE_FAILED = 3


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped (saved as client state)."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    loader: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ build_* parts

def build_train_data(cfg: PretrainConfig, ctx: DistContext) -> Any:
    from data_pipeline.loader import build_train_loader

    if not cfg.data.manifests:
        raise DataError(
            "data.manifests is empty: list the manifest.json of your token shards "
            "(written by launcher/shard.py), e.g. data.manifests=[runs/shards/manifest.json]"
        )
    return build_train_loader(cfg.data, cfg.train.micro_batch_size, ctx.rank, ctx.world_size)


def build_model_config(cfg: PretrainConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    model_cfg = resolve_model_config(cfg.model, vocab_size=vocab_size)
    if model_cfg.max_seq_len < seq_len:
        raise UserError(
            f"the token shards hold sequences of {seq_len} tokens but model.max_seq_len is "
            f"{model_cfg.max_seq_len}; set model.max_seq_len={seq_len} or shard with a shorter seq_len"
        )
    return model_cfg


def tokenizer_sha256(loader: Any) -> str | None:
    tok = getattr(loader, "tokenizer", None) or {}
    return tok.get("sha256") or tok.get("model_sha256")


def tokenizer_source_dir(loader: Any, manifest_path: str) -> Path | None:
    """The tokenizer folder named by the manifest (absolute, or relative to the manifest)."""
    tok = getattr(loader, "tokenizer", None) or {}
    for key in ("dir", "path", "tokenizer_dir"):
        if tok.get(key):
            path = Path(tok[key])
            if not path.is_absolute():
                path = Path(manifest_path).parent / path
            if path.is_file():
                path = path.parent
            return path if path.is_dir() else None
    return None


def write_run_files(run_dir: Path, cfg: PretrainConfig, ds_config: dict[str, Any], tok_dir: Path | None) -> None:
    """Rank 0: resolved config + provenance, the DeepSpeed JSON, a copy of the tokenizer."""
    write_provenance(run_dir, cfg)
    save_deepspeed_config(ds_config, run_dir / "deepspeed_config.json")
    if tok_dir is not None:
        from model.io import copy_tokenizer_files

        (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
        copy_tokenizer_files(tok_dir, run_dir / "tokenizer")


def _broadcast(obj: Any, src: int = 0) -> Any:
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def plan_resume(cfg: PretrainConfig, ctx: DistContext) -> tuple[ckpt.CheckpointInfo | None, bool]:
    """Rank 0 picks the checkpoint (broadcast so every rank agrees) and whether it must go
    through DeepSpeed's universal format (saved on another number of ranks, ZeRO 1-3)."""
    info = None
    if ctx.rank == 0:
        info = ckpt.find_resume_checkpoint(cfg.run_dir, cfg.checkpoint.resume)
    info = _broadcast(info)
    if info is None:
        return None, False
    saved_world = info.marker.get("world_size", ctx.world_size)
    universal = saved_world != ctx.world_size and info.marker.get("zero_stage", 0) >= 1
    if universal and cfg.train.zero_stage == 0:
        raise UserError(
            f"checkpoint {info.path} was saved with ZeRO stage {info.marker.get('zero_stage')} on "
            f"{saved_world} ranks; resuming on {ctx.world_size} ranks needs train.zero_stage >= 1"
        )
    if universal and ctx.rank == 0:
        log.info("checkpoint %s was saved on %d ranks, resuming on %d: converting to a universal "
                 "checkpoint", info.tag, saved_world, ctx.world_size)
        ckpt.convert_to_universal(info.path)
    dist.barrier()
    return info, universal


# ----------------------------------------------------------------------------------- Trainer

class Trainer:
    """Owns the engine, loaders, state and run directory for one pretraining run."""

    def __init__(self, cfg: PretrainConfig, ctx: DistContext) -> None:
        self._init_runtime(cfg, ctx)
        self.loader = build_train_data(cfg, ctx)
        self.seq_len = int(self.loader.seq_len)
        self.model_cfg = build_model_config(cfg, int(self.loader.vocab_size), self.seq_len)
        self.resolved = cfg.model_copy(update={"model": self.model_cfg})
        self.plan = resolve_batch(cfg.train, ctx.world_size)
        self.tok_sha = tokenizer_sha256(self.loader)
        self.tok_dir = tokenizer_source_dir(self.loader, cfg.data.manifests[0])
        self.resume_from, universal = plan_resume(cfg, ctx)
        if self.resume_from is not None:
            ckpt.check_compatible(
                ckpt.read_trainer_state(self.resume_from.path), config_to_dict(self.model_cfg), self.tok_sha
            )
        self.ds_config = build_deepspeed_config(cfg.train, cfg.optim, ctx.world_size, load_universal=universal)
        if ctx.rank == 0:
            write_run_files(self.run_dir, self.resolved, self.ds_config, self.tok_dir)
        model = build_model(self.model_cfg, self.ds_config, cfg.train.seed)
        self.engine, self.optimizer = build_engine(model, cfg.optim, self.ds_config)
        self.state = TrainState()
        if self.resume_from is not None:
            self._restore(self.resume_from, universal)
        self._init_metrics()

    def _init_runtime(self, cfg: Any, ctx: DistContext) -> None:
        """Run directory, fault handling and signals (shared with the fine-tune trainer)."""
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.run_dir)
        self.faults = FaultInjection.from_env()
        self.preempt = PreemptionFlag().install()
        self.bad_steps = BadStepPolicy(cfg.train.max_bad_steps)
        self.spikes = LossSpikeDetector(cfg.log.loss_spike_factor)

    def _init_metrics(self) -> None:
        """TensorBoard writer, FLOPs per token and device peak for MFU (needs model_cfg, seq_len)."""
        cfg, ctx = self.cfg, self.ctx
        self.metrics = MetricsWriter(self.run_dir / "tensorboard", ctx.rank == 0 and cfg.log.tensorboard)
        self.flops_per_token = _flops_per_token(self.model_cfg, self.seq_len)
        self.peak_tflops = device_peak_tflops(ctx.device, cfg.train.precision, cfg.log.peak_tflops)
        self._val_warned = False
        self.model_state_gb: float | None = None

    # -------------------------------------------------------------------------- resume / save
    def _restore(self, info: ckpt.CheckpointInfo, universal: bool) -> None:
        if universal:
            load_dir, tag = info.path, ckpt.UNIVERSAL
        else:
            load_dir, tag = info.path.parent, info.tag
        load_path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {info.path}; remove it or set checkpoint.resume=never")
        saved = ckpt.read_trainer_state(info.path)
        self.state = TrainState(
            step=saved["step"], consumed_samples=saved["consumed_samples"],
            consumed_tokens=saved["consumed_tokens"], skipped_steps=saved.get("skipped_steps", 0),
            loader=saved["loader"],
        )
        self.loader.load_state_dict(saved["loader"])
        self.bad_steps.total_skipped = self.state.skipped_steps
        if hasattr(self.optimizer, "skipped_steps"):
            self.optimizer.skipped_steps = self.state.skipped_steps
        same_world = saved.get("world_size") == self.ctx.world_size
        if same_world:
            ckpt.restore_rng_state(info.path, self.ctx.rank)
        log.info(
            "resumed from %s: step %d, consumed samples %d, consumed tokens %d%s", info.path,
            self.state.step, self.state.consumed_samples, self.state.consumed_tokens,
            "" if same_world else f" (saved on {saved.get('world_size')} ranks, universal checkpoint)",
        )

    def _client_state(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens,
            "skipped_steps": self.state.skipped_steps,
            "loader": self.loader.state_dict(),
            "world_size": self.ctx.world_size,
            "zero_stage": self.cfg.train.zero_stage,
            "model_config": config_to_dict(self.model_cfg),
            "config": config_to_dict(self.resolved),
            "tokenizer_sha256": self.tok_sha,
            "manifest_sha256s": list(getattr(self.loader, "manifest_sha256s", [])),
        }

    def _weights_finite(self) -> bool:
        finite = torch.ones(1)
        for p in self.engine.module.parameters():
            t = getattr(p, "ds_tensor", p)
            if t.numel() and not torch.isfinite(t).all():
                finite.zero_()
                break
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def save(self) -> float:
        """Save on every rank; rank 0 marks it complete after a barrier. Returns seconds taken."""
        start = time.perf_counter()
        step = self.state.step
        if not self._weights_finite():
            raise UserError(f"step {step}: the weights hold non-finite values; no checkpoint written")
        root = ckpt.checkpoint_root(self.run_dir)
        tag = ckpt.tag_for(step)
        path = root / tag
        if self.ctx.rank == 0 and path.exists():
            shutil.rmtree(path)  # an incomplete save of the same step from a crashed run
        dist.barrier()
        client = self._client_state()
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"crucible": client}, save_latest=False)
        ckpt.write_rng_state(path, self.ctx.rank)
        if self.ctx.rank == 0:
            ckpt.write_trainer_state(path, client)
        self.faults.maybe_kill_in_save(step, self.ctx.rank)
        dist.barrier()  # every rank has written its part
        if self.ctx.rank == 0:
            if self.cfg.checkpoint.write_model_dir:
                self._write_model_dir(path)
            ckpt.mark_complete(path, {"step": step, "world_size": self.ctx.world_size,
                                      "zero_stage": self.cfg.train.zero_stage})
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        dist.barrier()
        seconds = time.perf_counter() - start
        log.info("saved checkpoint %s in %.2f s", path, seconds)
        self.metrics.scalars(step, {"checkpoint/save_seconds": seconds})
        return seconds

    def _write_model_dir(self, path: Path) -> None:
        from model.io import save_model_dir

        if self.cfg.train.zero_stage == 0:
            state = {k: v.float() for k, v in self.engine.module.state_dict().items()}
        else:
            state = ckpt.consolidated_fp32_state_dict(path)
        tok = self.run_dir / "tokenizer"
        save_model_dir(path / ckpt.MODEL_DIR, state, self.model_cfg,
                       tokenizer_dir=tok if tok.is_dir() else None,
                       provenance=provenance(self.resolved))

    # ---------------------------------------------------------------------------- the loop
    def _micro_batches(self) -> Iterator[torch.Tensor]:
        return iter(self.loader)

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.ctx.device, non_blocking=True)
        logits = self.engine(tokens[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    def _record_samples(self, step: int, tokens: torch.Tensor) -> None:
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        hashes = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in tokens.cpu()]
        with open(out / f"rank{self.ctx.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "samples": hashes}) + "\n")

    def train_step(self, batches: Iterator[torch.Tensor]) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro batches; returns its metrics."""
        step = self.state.step
        self.faults.maybe_hang(step, self.ctx.rank)
        lr = lr_at(step, self.cfg.optim.lr, self.cfg.schedule, self.cfg.train.max_steps)
        set_lr(self.optimizer, lr)
        if hasattr(self.optimizer, "last_step_skipped"):
            self.optimizer.last_step_skipped = False
        start = time.perf_counter()
        data_wait = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(self.plan.grad_accum_steps):
            t0 = time.perf_counter()
            tokens = next(batches)
            data_wait += time.perf_counter() - t0
            if self.faults.record_samples:
                self._record_samples(step, tokens)
            loss = self._loss(tokens)
            if self.faults.nan_now(step, self.ctx.rank):
                loss = loss * float("nan")
            self.engine.backward(loss)
            if self.model_state_gb is None and step >= 1 and micro == self.plan.grad_accum_steps - 1:
                # weights + gradients + optimizer state held by this rank (ZeRO shards counted),
                # at the gradient peak of the second step (AdamW creates its state lazily in
                # the first): after the last backward, before the optimizer step
                self.model_state_gb = model_state_bytes(self.engine) / 1024**3
            self.engine.step()
            loss_sum += loss.detach().double().cpu()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # every micro batch holds the same number of tokens (packed, no padding), so the mean of
        # the micro-batch means over steps and ranks is the per-token mean
        stats = torch.tensor([loss_sum.item(), float(self.plan.grad_accum_steps), float(self.preempt.is_set)],
                             dtype=torch.float64)
        dist.all_reduce(stats)
        step_time = time.perf_counter() - start
        mean_loss = stats[0].item() / stats[1].item()
        # ZeRO 1/2 detect the overflow themselves and never call our optimizer; otherwise
        # SkippingAdamW skipped it (same decision on every rank either way)
        skipped = bool(getattr(self.optimizer, "last_step_skipped", False)) or not self.engine.was_step_applied()
        if not skipped and not (math.isfinite(mean_loss) and math.isfinite(grad_norm)) \
                and self.cfg.optim.implementation == "deepspeed":
            log.error("step %d: non-finite loss/gradient norm with DeepSpeed's own optimizer, which "
                      "cannot skip the step; use optim.implementation=torch", step)
        return self._finish_step(step, lr, mean_loss, grad_norm, skipped,
                                 self.plan.global_batch_size * self.seq_len, step_time, data_wait,
                                 stop=stats[2].item() > 0)

    def _finish_step(self, step: int, lr: float, mean_loss: float, grad_norm: float, skipped: bool,
                     tokens: int, step_time: float, data_wait: float, stop: bool) -> dict[str, float]:
        """Advance the state by one optimizer step and return its metrics (shared with fine-tuning)."""
        self.bad_steps.record(step, skipped, mean_loss, grad_norm)
        self.state.step += 1
        self.state.skipped_steps = self.bad_steps.total_skipped
        self.state.consumed_samples += self.plan.global_batch_size
        self.state.consumed_tokens += tokens
        self.spikes.update(step, mean_loss)
        tokens_per_second = tokens / step_time
        return {
            "train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens_per_second": tokens_per_second,
            "train/mfu": mfu(tokens_per_second, self.flops_per_token, self.peak_tflops, self.ctx.world_size),
            "train/data_wait_fraction": data_wait / step_time, "train/step_time": step_time,
            "train/memory_gb": peak_memory_gb(self.ctx.device),
            "train/skipped_steps": float(self.state.skipped_steps),
            "_stop": stop,
        }

    def evaluate(self) -> dict[str, float] | None:
        """Mean per-token validation loss over ``train.eval_batches`` micro batches per rank."""
        from data_pipeline.loader import build_eval_loader

        try:
            batches = build_eval_loader(self.cfg.data, self.cfg.train.micro_batch_size,
                                        self.ctx.rank, self.ctx.world_size, split="validation")
        except DataError as exc:
            if not self._val_warned:
                log.warning("no validation: %s", exc)
                self._val_warned = True
            return None
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i, tokens in enumerate(batches):
                if i >= self.cfg.train.eval_batches:
                    break
                loss = self._loss(tokens)
                n = tokens[:, 1:].numel()
                total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        self.engine.train()
        dist.all_reduce(total)
        if total[1] == 0:
            return None
        val_loss = (total[0] / total[1]).item()
        return {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 80.0))}

    def _done(self) -> bool:
        max_tokens = self.cfg.train.max_tokens
        return self.state.step >= self.cfg.train.max_steps or (
            max_tokens is not None and self.state.consumed_tokens >= max_tokens)

    def _log_step(self, metrics: dict[str, float]) -> None:
        step = self.state.step
        scalars = {k: v for k, v in metrics.items() if not k.startswith("_")}
        if self.ctx.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "consumed_samples": self.state.consumed_samples,
                                    **scalars}) + "\n")
        if step % self.cfg.log.every == 0 or step == 1 or "val/loss" in scalars:
            self.metrics.scalars(step, scalars)
            shown = " ".join(f"{k.removeprefix('train/').replace('/', '_')}={v:.4g}" for k, v in scalars.items())
            log.info("step %d %s", step, shown)

    def run(self) -> int:
        """Train until max_steps / max_tokens or a preemption signal; returns the exit status."""
        cfg = self.cfg
        self.engine.train()
        batches = self._micro_batches()
        log.info("training %s: %d ranks, ZeRO %d, %s, global batch %d (%d x %d x %d), %d tokens/seq, "
                 "start step %d", self.run_dir, self.ctx.world_size, cfg.train.zero_stage,
                 cfg.train.precision, self.plan.global_batch_size, self.plan.micro_batch_size,
                 self.plan.grad_accum_steps, self.plan.data_parallel_size, self.seq_len, self.state.step)
        saved_at = self.state.step if self.resume_from is not None else -1
        while not self._done():
            known = self.model_state_gb is not None
            metrics = self.train_step(batches)
            step = self.state.step
            if not known and self.model_state_gb is not None:
                metrics["memory/model_state_gb"] = self.model_state_gb
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(self.evaluate() or {})
            self._log_step(metrics)
            if metrics["_stop"]:
                log.warning("preemption signal: saving a checkpoint at step %d and exiting", step)
                self.save()
                return 0
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not self._done():
                self.save()
                saved_at = step
        if cfg.train.eval_every == 0 or self.state.step % cfg.train.eval_every:
            final = self.evaluate()
            if final:
                self._log_step(final | {"_stop": False})
        if saved_at != self.state.step:
            self.save()
        self.metrics.close()
        log.info("finished at step %d (%d tokens); run directory %s", self.state.step,
                 self.state.consumed_tokens, self.run_dir)
        return 0


def _flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    from model.flops import flops_per_token

    return flops_per_token(model_cfg, seq_len)


# -------------------------------------------------------------------------------- dry run

def dry_run_report(cfg: PretrainConfig, world_size: int | None = None) -> int:
    """Validate, print the DeepSpeed config and model-state memory per GPU; no training."""
    from model.flops import num_params

    world = world_size or env_world_size()
    model_cfg = resolve_model_config(cfg.model)
    ds_config = build_deepspeed_config(cfg.train, cfg.optim, world)
    if env_rank() != 0:
        return 0
    total = num_params(model_cfg)
    largest = model_cfg.vocab_size * model_cfg.dim
    print(f"model: {model_cfg.preset or 'custom'}, {total / 1e6:.1f}M parameters")
    print("deepspeed config (data-parallel size %d):" % world)
    print(json.dumps(ds_config, indent=2, sort_keys=True))
    print("model-state memory from DeepSpeed's estimators (weights, gradients, optimizer; "
          "activations excluded):")
    plans = [(min(world, 8), max(1, math.ceil(world / 8)))]
    plans += [p for p in ((8, 1), (8, 2), (8, 4), (8, 8), (8, 16)) if p != plans[0]]
    for i, (gpus, nodes) in enumerate(plans):
        est = estimate_memory_per_gpu(cfg.train, total, largest, gpus, nodes)
        print(f"  {nodes:>3} node(s) x {gpus} GPU(s): {est['gpu_gib']:8.2f} GiB per GPU, "
              f"{est['cpu_gib_per_node']:8.2f} GiB CPU per node" + ("   <- this plan" if i == 0 else ""))
    return 0


def pretrain(cfg: PretrainConfig, dry_run: bool = False, world_size: int | None = None) -> int:
    """Run (or with ``dry_run`` only check, planning for ``world_size`` GPUs) pretraining."""
    if dry_run:
        return dry_run_report(cfg, world_size)
    wants_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    check_device_support(cfg.train, "cuda" if wants_cuda else "cpu")
    ctx = init_distributed(cfg.train)
    run_dir = Path(cfg.run_dir)
    setup_logging(cfg.log.level, rank=ctx.rank, all_ranks=cfg.log.all_ranks,
                  rank_log_dir=run_dir / "logs" if cfg.log.rank_files else None)
    trainer = Trainer(cfg, ctx)
    try:
        return trainer.run()
    except RuntimeError as exc:
        if not _is_collective_failure(exc):
            raise
        log.error(
            "a collective operation failed (a rank died, or hung longer than "
            "train.collective_timeout_s=%s s): %s; exiting", cfg.train.collective_timeout_s,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        logging.shutdown()
        os._exit(EXIT_COLLECTIVE_FAILED)  # the process group is broken: skip its teardown
    finally:
        trainer.preempt.uninstall()


def _is_collective_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("gloo", "connection closed", "timed out", "timeout", "nccl", "connection reset")
    )
