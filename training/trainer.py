"""The training loop: one :class:`Trainer` for pretraining, fine-tuning and the LR range test.

The loop owns the run directory, resume (with DeepSpeed's universal checkpoints across rank
counts), saving with the completion marker, preemption, the non-finite step policy, the
learning-rate schedule (an object it asks), the step metrics and the callbacks; what differs
per workload is a step module (:mod:`training.steps`): language modelling or a task head.
:func:`run_training` is the one entry that starts any of them, under the deepspeed launcher,
torchrun, Slurm, as one plain python process, or inside an initialised gloo group (tests), and
handles a failed collective the same way for all.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.config import Section, config_to_dict, describe_value
from crucible.errors import ConfigError, UserError
from crucible.provenance import write_provenance
from crucible.runtime import setup_logging
from model.flops import flops_per_token
from model.io import copy_tokenizer_files
from training import checkpoint as ckpt
from training.callbacks.base import Callback
from training.callbacks.faults import FaultInjection
from training.callbacks.metrics import MetricsLogger
from training.callbacks.spikes import LossSpikeLogger
from training.collectives import (
    barrier,
    broadcast_object,
    gather_objects,
    sum_over_ranks,
    true_on_every_rank,
)
from training.deepspeed_config import (
    build_deepspeed_config,
    check_device_support,
    ranks_per_node,
    resolve_batch,
    save_deepspeed_config,
)
from training.engine import (
    DistContext,
    check_writable_on_every_rank,
    init_distributed,
    release_cpu_shm_segment,
)
from training.faults import BadStepPolicy, PreemptionFlag
from training.metrics import StartupClock, device_peak_tflops, mfu, peak_memory_gb
from training.optim import all_finite
from training.parallel import MODEL_PARALLEL_KEYS, Layout
from training.schedule import ConfiguredSchedule, LRSchedule, configured_schedule
from training.steps.base import StepModule

log = logging.getLogger("crucible.training.trainer")

EXIT_COLLECTIVE_FAILED = 3


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped (saved as client state)."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0
    """Training samples replaced because their shard was unusable (``data.on_corrupt_shard=skip``),
    summed over ranks, over the whole run (``data/skipped_samples``)."""


def write_run_files(run_dir: Path, cfg: Section, ds_config: dict[str, Any], tok_dir: Path | None) -> None:
    """Rank 0: resolved config + provenance, the DeepSpeed JSON, a copy of the tokenizer."""
    write_provenance(run_dir, cfg)
    save_deepspeed_config(ds_config, run_dir / "deepspeed_config.json")
    if tok_dir is not None:
        (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
        copy_tokenizer_files(tok_dir, run_dir / "tokenizer")


def plan_resume(cfg: Any, ctx: DistContext) -> tuple[ckpt.CheckpointInfo | None, bool]:
    """The checkpoint to resume, the same on every rank, and whether it must go through
    DeepSpeed's universal format (saved on another number of ranks, ZeRO 1-3).

    Nothing is loaded before every rank agrees the checkpoint is whole: rank 0 lists the
    candidates and checks each (marker, JSON files, file sizes: :func:`training.checkpoint.
    checkpoint_problem`), the ranks share the CRC check of its torch files, and the newest one
    no rank found a problem with is used; a damaged one is skipped with a warning naming the
    file (:func:`training.checkpoint.select_checkpoint`). Errors reach every rank as the same
    one-line :class:`UserError`, never as a failed collective on the others. A checkpoint that
    needs the universal format is used only once ``launcher/checkpoint.py universal`` has
    converted it (whole); without that every rank stops at once with the command to run.
    """
    resume = cfg.checkpoint.resume
    candidates, error = None, None
    if ctx.rank == 0:
        try:
            candidates = ckpt.resume_candidates(cfg.run_dir, resume)
        except UserError as exc:
            error = str(exc)
    candidates, error = broadcast_object((candidates, error))
    if error:
        raise UserError(error)

    def check(path: Path) -> str | None:
        problem = broadcast_object(ckpt.checkpoint_problem(path) if ctx.rank == 0 else None)
        if problem is None:
            found = gather_objects(ckpt.torch_files_problem(path, ctx.rank, ctx.world_size), ctx.world_size)
            problem = next((p for p in found if p), None)
        return problem

    info = ckpt.select_checkpoint(candidates, resume not in ("auto", "never"), check, warn=ctx.rank == 0)
    if info is None:
        return None, False
    saved_world = info.marker.get("world_size", ctx.world_size)
    universal = saved_world != ctx.world_size and info.marker.get("zero_stage", 0) >= 1
    if universal and cfg.train.zero_stage == 0:
        raise UserError(
            f"checkpoint {info.path} was saved with ZeRO stage {info.marker.get('zero_stage')} on "
            f"{saved_world} ranks; resuming on {ctx.world_size} ranks needs train.zero_stage >= 1"
        )
    for key, what in (("tensor_parallel", "AutoTP"), ("pipeline_stages", "pipeline")):
        if universal and getattr(cfg.train, key, 1) > 1:
            raise UserError(
                f"checkpoint {info.path} was saved on {saved_world} ranks with train.{key}="
                f"{getattr(cfg.train, key)}; resuming it on {ctx.world_size} ranks is not supported (the "
                f"universal conversion of {what} checkpoints was not verified): resume on {saved_world} ranks"
            )
    if universal:
        # the conversion reads and writes every optimizer shard (12 bytes a parameter, ~840 GB
        # for 70B), far past any collective timeout: an offline command, never run here; every
        # rank stops with the same line naming it
        problem = broadcast_object(ckpt.universal_problem(info.path) if ctx.rank == 0 else None)
        if problem:
            raise UserError(
                f"checkpoint {info.path} was saved on {saved_world} ranks with ZeRO stage "
                f"{info.marker.get('zero_stage')}; resuming it on {ctx.world_size} ranks needs its "
                f"universal conversion ({problem}): run `python launcher/checkpoint.py universal "
                f"{cfg.run_dir} --step {info.step} --workers 8` (offline, once), then start this run again"
            )
    barrier()
    return info, universal


@contextmanager
def _recording_loads(engine: Any) -> Iterator[list[str]]:
    """The files DeepSpeed's checkpoint engine opens meanwhile, in order, so that a load that
    fails inside DeepSpeed can name its file (DeepSpeed's errors do not)."""
    opened: list[str] = []
    io = getattr(engine, "checkpoint_engine", None)
    if io is None:
        yield opened
        return
    original = io.load

    def load(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return original(path, *args, **kwargs)

    io.load = load
    try:
        yield opened
    finally:
        io.load = original


class Trainer:
    """The loop over optimizer steps of one run (see the module docstring).

    ``checkpoints=False`` saves nothing and resumes from nothing; ``evaluate=False`` never
    evaluates (the LR range test uses both). ``startup`` times the start-up phases (logged before
    the first step).
    """

    def __init__(self, cfg: Any, ctx: DistContext, step_module: StepModule,
                 callbacks: Sequence[Callback] = (), schedule: LRSchedule | None = None,
                 checkpoints: bool = True, evaluate: bool = True, startup: StartupClock | None = None) -> None:
        self.cfg, self.ctx, self.step_module = cfg, ctx, step_module
        self.run_dir = Path(cfg.run_dir)
        self.startup = startup or StartupClock()
        if checkpoints:
            check_writable_on_every_rank(ckpt.checkpoint_root(self.run_dir), ctx.rank, ctx.world_size)
        self.callbacks = list(callbacks)
        self.schedule = schedule or ConfiguredSchedule(cfg.optim.lr, cfg.schedule, cfg.train.max_steps)
        if schedule is None and cfg.schedule.warmup_steps >= cfg.train.max_steps:
            log.warning(
                "%s >= %s: the whole run is warm-up and the learning rate ends at %.3g of "
                "optim.lr=%g (fine for a smoke test; for the recipe's schedule set "
                "schedule.warmup_steps below train.max_steps)",
                describe_value(cfg, "schedule.warmup_steps"), describe_value(cfg, "train.max_steps"),
                self.schedule(cfg.train.max_steps - 1) / cfg.optim.lr, cfg.optim.lr)
        self.checkpoints, self.evaluations = checkpoints, evaluate
        self.preempt = PreemptionFlag().install()
        self.bad_steps = BadStepPolicy(cfg.train.max_bad_steps)
        self.stop_requested = False
        for name in MODEL_PARALLEL_KEYS:
            size = getattr(cfg.train, name)
            if size > 1 and name not in getattr(step_module, "supports_model_parallel", ()):
                raise ConfigError(f"train.{name}={size} applies to language-model pretraining only; "
                                  f"{type(step_module).__name__} runs the whole model on whole sequences: set "
                                  f"train.{name}=1")
        # the ranks of a sequence-, pipeline- or tensor-parallel group read the same samples
        dp_size = Layout.of(ctx.rank, ctx.world_size, cfg.train).data_parallel_size
        self.plan = resolve_batch(cfg.train, dp_size)
        self.data = step_module.prepare(self.plan)
        if schedule is None:  # LR segments of data phases start where the loader switches mix
            self.schedule = configured_schedule(cfg, self.plan.global_batch_size * step_module.seq_len)
        self.resume_from, universal = plan_resume(cfg, ctx) if checkpoints else (None, False)
        self.last_saved: Path | None = None  # the checkpoint this process saved last
        self.startup.mark("data and resume plan")
        if self.resume_from is not None:
            saved_state = ckpt.read_trainer_state(self.resume_from.path)
            ckpt.check_compatible(saved_state, config_to_dict(step_module.model_cfg), step_module.tokenizer_sha256)
            for name in MODEL_PARALLEL_KEYS:
                saved, now = saved_state.get(name, 1), getattr(cfg.train, name)
                if saved != now:
                    raise ConfigError(f"checkpoint {self.resume_from.path} was saved with train.{name}={saved} "
                                      f"and this run sets {now}: resume with the same {name} (changing it is "
                                      "not supported)")
        self.ds_config = build_deepspeed_config(cfg.train, cfg.optim, dp_size, load_universal=universal,
                                                ranks_per_node=ranks_per_node(ctx.world_size))
        if ctx.rank == 0:
            write_run_files(self.run_dir, step_module.run_config, self.ds_config, step_module.tokenizer_dir)
        # the run's own checkpoint wins over any start weights (init_from) the step module has
        step_module.resuming = self.resume_from is not None
        self.engine, self.optimizer = step_module.build_engine(self.ds_config)
        self.state = TrainState()
        self._data_skipped_seen = 0  # this process's loader count already in state.skipped_samples
        if self.resume_from is not None:
            self._restore(self.resume_from, universal)
        self.startup.mark("model and DeepSpeed engine")
        self.flops_per_token = flops_per_token(step_module.model_cfg, step_module.seq_len)
        self.peak_tflops = device_peak_tflops(ctx.device, cfg.train.precision, cfg.log.peak_tflops,
                                              ctx.rank, ctx.world_size)
        self.startup.mark("device peak")

    def _fire(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def request_stop(self) -> None:
        """End the loop after the current step (a callback's decision; every rank must agree)."""
        self.stop_requested = True

    @property
    def finished(self) -> bool:
        """``train.max_steps`` or ``train.max_tokens`` reached."""
        max_tokens = self.cfg.train.max_tokens
        return self.state.step >= self.cfg.train.max_steps or (
            max_tokens is not None and self.state.consumed_tokens >= max_tokens)

    # -------------------------------------------------------------------------- resume / save
    def _restore(self, info: ckpt.CheckpointInfo, universal: bool) -> None:
        if universal:
            load_dir, tag = info.path, ckpt.UNIVERSAL
        else:
            load_dir, tag = info.path.parent, info.tag
        advice = (f"move {info.path} out of {info.path.parent} (the resume then takes the previous "
                  "checkpoint) or set checkpoint.resume to an older one")
        try:
            with _recording_loads(self.engine) as opened:
                load_path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
        except Exception as exc:  # noqa: BLE001 - becomes one line naming the file
            if is_collective_failure(exc):
                raise UserError(f"another rank could not load checkpoint {info.path} (its log names "
                                f"the file); {advice}") from None
            # a file the checks before loading could not judge (bytes that pass the CRCs, a
            # pickle of another version); the others learn of it when this rank exits, as a
            # failed collective in the load or in the agreement below (a fallback is not safe:
            # they may be inside one of DeepSpeed's collectives)
            where = opened[-1] if opened else str(info.path)
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(f"cannot resume from {info.path}: loading {where} failed "
                            f"({type(exc).__name__}: {first}); {advice}") from None
        if load_path is None:
            raise UserError(f"DeepSpeed found no checkpoint to load in {info.path}; {advice}")
        try:
            true_on_every_rank(torch.ones((), device=self.ctx.device))  # every rank has loaded
        except RuntimeError as exc:
            if not is_collective_failure(exc):
                raise
            raise UserError(f"another rank could not load checkpoint {info.path} (its log names "
                            f"the file); {advice}") from None
        saved = ckpt.read_trainer_state(info.path)
        self.state = TrainState(step=saved["step"], consumed_samples=saved["consumed_samples"],
                                consumed_tokens=saved["consumed_tokens"],
                                skipped_steps=saved.get("skipped_steps", 0),
                                skipped_samples=saved.get("skipped_samples", 0))
        self.data.load_state_dict(saved["loader"])
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
            "skipped_samples": self.state.skipped_samples,
            "loader": self.data.state_dict(),
            "world_size": self.ctx.world_size,
            **{name: getattr(self.cfg.train, name) for name in MODEL_PARALLEL_KEYS},
            "zero_stage": self.cfg.train.zero_stage,
            "config": config_to_dict(self.step_module.run_config),
            **self.step_module.client_state(),
        }

    def _weights_finite(self) -> bool:
        # ZeRO-3 ranks hold partitions (ds_tensor); the others full parameters
        local = [t for t in (getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()) if t.numel()]
        return true_on_every_rank(all_finite(local).to(self.ctx.device))

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
        barrier()
        client = self._client_state()
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"crucible": client}, save_latest=False)
        ckpt.write_rng_state(path, self.ctx.rank)
        if self.ctx.rank == 0:
            ckpt.write_trainer_state(path, client)
            # the model directory's files but the weights; consolidation adds those from the shards
            self.step_module.save_model_dir(path / ckpt.MODEL_FILES, None)
        self._fire("rank_saved", path)
        barrier()  # every rank has written its part
        if self.ctx.rank == 0:
            ckpt.mark_complete(path, {"step": step, "world_size": self.ctx.world_size,
                                      "zero_stage": self.cfg.train.zero_stage})
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        barrier()
        seconds = time.perf_counter() - start
        log.info("saved checkpoint %s in %.2f s", path, seconds)
        self._fire("post_save", path, seconds)
        self.last_saved = path
        if self.cfg.checkpoint.write_model_dir == "every_save" and self.ctx.rank == 0:
            ckpt.consolidate_model_dir(path)  # the others wait at their next collective
        return seconds

    # ---------------------------------------------------------------------------- the loop
    def _train_step(self, data: Iterator[Any]) -> tuple[dict[str, float], bool]:
        """One optimizer step over ``grad_accum_steps`` micro batches; its metrics, and whether
        a preemption signal reached any rank."""
        step = self.state.step
        start = time.perf_counter()
        batch = [next(data) for _ in range(self.plan.grad_accum_steps)]
        data_wait = time.perf_counter() - start
        self._fire("pre_step", batch)
        lr = self.schedule(step)
        self.step_module.set_lr(step, lr)
        if hasattr(self.optimizer, "last_step_skipped"):
            self.optimizer.last_step_skipped = False
        out = self.step_module.train_step(batch, step)
        device = self.ctx.device
        # one collective and one host sync per step: the step's sums over ranks with the
        # preemption flag and the samples the loader replaced (corrupt shards), read together
        # with the (already global) gradient norm
        loader_skipped = int(getattr(self.data, "skipped_samples", 0))  # this process, so far
        local = [out.loss_sum, out.loss_count, out.tokens, float(self.preempt.is_set),
                 float(loader_skipped - self._data_skipped_seen)]
        self._data_skipped_seen = loader_skipped
        stats = sum_over_ranks(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                            for v in local]), device)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm,
                                    dtype=torch.float64, device=device)
        loss_sum, loss_count, tokens, stop, data_skipped, grad_norm = \
            torch.cat([stats, grad_norm.reshape(1)]).tolist()
        step_time = time.perf_counter() - start
        mean_loss = loss_sum / max(loss_count, 1.0)
        tokens = int(tokens)
        # ZeRO 1/2 detect the overflow themselves and never call our optimizer; otherwise
        # SkippingAdamW skipped it (same decision on every rank either way)
        skipped = bool(getattr(self.optimizer, "last_step_skipped", False)) or not self.engine.was_step_applied()
        if not skipped and not (math.isfinite(mean_loss) and math.isfinite(grad_norm)) \
                and self.cfg.optim.implementation == "deepspeed":
            log.error("step %d: non-finite loss/gradient norm with DeepSpeed's own optimizer, which "
                      "cannot skip the step; use optim.implementation=torch", step)
        self.bad_steps.record(step, skipped, mean_loss, grad_norm)
        self.state.step += 1
        self.state.skipped_steps = self.bad_steps.total_skipped
        self.state.consumed_samples += self.plan.global_batch_size
        self.state.consumed_tokens += tokens
        self.state.skipped_samples += int(data_skipped)
        tokens_per_second = tokens / step_time
        utilisation = mfu(tokens_per_second, self.flops_per_token, self.peak_tflops, self.ctx.world_size)
        metrics = {
            "train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens_per_second": tokens_per_second,
            **({"train/mfu": utilisation} if utilisation is not None else {}),
            "train/data_wait_fraction": data_wait / step_time, "train/step_time": step_time,
            "train/memory_gb": peak_memory_gb(self.ctx.device),
            "train/skipped_steps": float(self.state.skipped_steps),
            **({"data/skipped_samples": float(self.state.skipped_samples)}
               if hasattr(self.data, "skipped_samples") else {}),  # loaders that can skip
            **out.extra,
        }
        return metrics, stop > 0

    def _evaluate(self, full: bool = False) -> None:
        """The step module's evaluation; ``full``: its end-of-run pass over all of the validation
        data (:meth:`StepModule.evaluate_full`)."""
        metrics = self.step_module.evaluate_full() if full else self.step_module.evaluate()
        if metrics:
            self._fire("post_eval", metrics)

    def run(self) -> int:
        """Train until max_steps / max_tokens, a preemption signal or a callback's stop; returns
        the exit status."""
        cfg = self.cfg
        self.engine.train()
        data = iter(self.data)
        basic_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside ZeRO's wrapper
        log.info("training %s: %d ranks, ZeRO %d, %s, optimizer %s, global batch %d (%d x %d x %d), "
                 "%d tokens/seq, start step %d", self.run_dir, self.ctx.world_size, cfg.train.zero_stage,
                 cfg.train.precision, type(basic_optimizer).__name__, self.plan.global_batch_size,
                 self.plan.micro_batch_size, self.plan.grad_accum_steps, self.plan.data_parallel_size,
                 self.step_module.seq_len, self.state.step)
        saved_at = self.state.step if self.resume_from is not None else -1
        eval_every = cfg.train.eval_every if self.evaluations else 0
        startup_seconds: float | None = self.startup.seconds()
        log.info("%s", self.startup.summary())
        while not self.finished and not self.stop_requested:
            metrics, preempted = self._train_step(data)
            if startup_seconds is not None:  # the first step of this process
                metrics["startup/seconds_to_first_step"], startup_seconds = startup_seconds, None
            step = self.state.step
            if eval_every and step % eval_every == 0:
                self._evaluate()
            self._fire("post_step", metrics)
            if preempted:
                log.warning("preemption signal: saving a checkpoint at step %d and exiting", step)
                if self.checkpoints:
                    self.save()
                self._fire("at_end")
                return 0
            if self.checkpoints and cfg.checkpoint.every and step % cfg.checkpoint.every == 0 \
                    and not self.finished:
                self.save()
                saved_at = step
        if self.evaluations and (eval_every == 0 or self.state.step % eval_every):
            self._evaluate()
        if self.evaluations:
            self._evaluate(full=True)
        if self.checkpoints and saved_at != self.state.step:
            self.save()
        self._fire("at_end")
        final = self.last_saved or (self.resume_from.path if self.resume_from is not None else None)
        if self.checkpoints and final is not None and self.ctx.rank == 0 \
                and cfg.checkpoint.write_model_dir != "never":
            # after the last collective: the other ranks exit meanwhile, none waits on this
            ckpt.consolidate_model_dir(final)
        skipped = self.state.skipped_samples
        if skipped:
            log.warning("%d of %d training samples (%.2f%%) came from corrupt token shards and were "
                        "replaced by other rows of their batch (data.on_corrupt_shard=skip); the "
                        "rank logs name the shards; check them with launcher/shard.py --verify",
                        skipped, self.state.consumed_samples,
                        100 * skipped / max(self.state.consumed_samples, 1))
        replaced = (f", {skipped} samples replaced from corrupt shards"
                    if hasattr(self.data, "skipped_samples") else "")
        log.info("finished at step %d (%d tokens%s); run directory %s", self.state.step,
                 self.state.consumed_tokens, replaced, self.run_dir)
        return 0


def default_callbacks(cfg: Any, ctx: DistContext) -> list[Callback]:
    """Metrics writing and loss-spike logging, the harness evaluation when pretraining names
    tasks (``harness.tasks``), plus the test faults set in the environment."""
    callbacks: list[Callback] = [MetricsLogger(Path(cfg.run_dir), ctx.rank, cfg.log.every, cfg.log.tensorboard),
                                 LossSpikeLogger(cfg.log.loss_spike_factor)]
    harness = getattr(cfg, "harness", None)  # a pretraining config section only
    if harness is not None and harness.tasks:
        from training.callbacks.harness import HarnessEvaluation

        callbacks.append(HarnessEvaluation(harness, Path(cfg.run_dir), ctx.rank, cfg.log.tensorboard,
                                           cfg.train.collective_timeout_s))
    faults = FaultInjection.from_env()
    return callbacks + ([faults] if faults else [])


def is_collective_failure(exc: BaseException) -> bool:
    """A dead or hung peer: the process group is broken, no clean teardown is possible."""
    text = str(exc).lower()
    return isinstance(exc, getattr(torch.distributed, "DistBackendError", ())) or any(
        s in text for s in ("gloo", "connection closed", "timed out", "timeout", "nccl", "connection reset")
    )


def run_training(cfg: Any, make_step: Callable[[DistContext], StepModule],
                 callbacks: Callable[[DistContext], Sequence[Callback]] | None = None,
                 schedule: LRSchedule | None = None, checkpoints: bool = True, evaluate: bool = True) -> int:
    """Join the process group, build the step module and the loop, train; returns the exit status.

    ``make_step`` and ``callbacks`` receive the distributed context (rank, world size, device);
    without ``callbacks`` the run gets :func:`default_callbacks`. A failed collective (a rank
    died, or hung past ``train.collective_timeout_s``) is logged in one line and the process
    exits with status 3 at once, skipping the broken process group's teardown.
    """
    startup = StartupClock()
    startup.mark("imports and config")
    wants_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    check_device_support(cfg.train, "cuda" if wants_cuda else "cpu")
    ctx = init_distributed(cfg.train)
    startup.mark("process group")
    setup_logging(cfg.log.level, rank=ctx.rank, all_ranks=cfg.log.all_ranks,
                  rank_log_dir=Path(cfg.run_dir) / "logs" if cfg.log.rank_files else None)
    trainer = Trainer(cfg, ctx, make_step(ctx),
                      callbacks(ctx) if callbacks is not None else default_callbacks(cfg, ctx),
                      schedule=schedule, checkpoints=checkpoints, evaluate=evaluate, startup=startup)
    try:
        return trainer.run()
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        log.error(
            "a collective operation failed (a rank died, or hung longer than "
            "train.collective_timeout_s=%s s): %s; exiting", cfg.train.collective_timeout_s,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        logging.shutdown()
        release_cpu_shm_segment(ctx.rank)  # os._exit skips the atexit handlers
        os._exit(EXIT_COLLECTIVE_FAILED)  # the process group is broken: skip its teardown
    finally:
        trainer.preempt.uninstall()
