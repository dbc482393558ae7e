"""Language modelling with pipeline parallelism (``train.pipeline_stages`` > 1): the same
workload as :class:`training.steps.language_model.LanguageModelStep` on DeepSpeed's
``PipelineEngine``.

The model is :func:`model.pipeline.build_pipeline_module` (embedding, blocks, final norm and head
as pipeline layers, blocks spread evenly over the stages). Every rank reads the same micro
batches as the other stages of its data-parallel group (stage 0 feeds the tokens in, the last
stage reads the targets, middle stages draw and drop them so that every rank's loader state is
the same); ``engine.train_batch`` runs one optimizer step over them (1F1B schedule) and returns
the step's mean loss on every rank. Validation runs each micro batch through
``engine.eval_batch`` with a loss function that returns the per-source sums of
:func:`training.steps.language_model.next_token_sums`; the last stage contributes them.
Checkpoints are DeepSpeed's pipeline checkpoints (one file per layer plus each rank's ZeRO-1
optimizer shard); the loop's resume, preemption, non-finite policy and metrics are unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from model.pipeline import build_pipeline_module, head_weight_of, model_parameters
from training.config import PretrainConfig
from training.engine import DistContext, build_engine
from training.metrics import model_state_bytes
from training.optim import build_optimizer, param_groups
from training.steps.base import StepOutput
from training.steps.language_model import LanguageModelStep, next_token_sums

log = logging.getLogger("crucible.training.pipeline")


class PipelineLanguageModelStep(LanguageModelStep):
    """Next-token pretraining over ``train.pipeline_stages`` stages (see the module docstring)."""

    supports_model_parallel = ("pipeline_stages",)

    def __init__(self, cfg: PretrainConfig, ctx: DistContext) -> None:
        super().__init__(cfg, ctx)
        self.is_first_stage = self.layout.pipeline_stage == 0
        self.is_last_stage = self.layout.pipeline_stage == self.layout.pipeline_stages - 1

    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
        cfg, layout = self.cfg, self.layout
        self.pipe = build_pipeline_module(self.model_cfg, layout.pipeline_stages, layout.data_parallel_size,
                                          cfg.train.seed, cfg.train.loss_chunk_tokens,
                                          checkpoint_every=self.model_cfg.checkpoint_every)
        self.train_loss = self.pipe.loss_fn
        if self.init_source is not None:  # each stage fills its own layers (a tied embedding on both ends)
            self._start_from_source(self.pipe, False, model_parameters(self.pipe, self.model_cfg))
        optim = cfg.optim
        groups = param_groups(self.pipe, optim)
        optimizer = (None if optim.implementation == "deepspeed"
                     else build_optimizer(groups, optim, ds_config["zero_optimization"]["stage"]))
        self.engine, self.optimizer = build_engine(self.pipe, ds_config, optimizer, model_parameters=groups)
        if self.layout.rank == 0:
            parts = self.pipe.parts
            log.info("pipeline of %d stages: layers %s (0 embedding, 1-%d blocks, %d norm, %d head)",
                     layout.pipeline_stages, ", ".join(f"{parts[s]}-{parts[s + 1] - 1}" for s in range(len(parts) - 1)),
                     self.model_cfg.n_layers, self.model_cfg.n_layers + 1, self.model_cfg.n_layers + 2)
        return self.engine, self.optimizer

    def train_step(self, batch: list[torch.Tensor], step: int) -> StepOutput:
        """One ``train_batch`` over the micro batches; every rank reports the step's mean loss
        (already averaged over the data-parallel ranks by DeepSpeed) per micro batch, and the
        first stage the tokens (each sample counted once)."""
        device = self.ctx.device
        micro = iter([(t[:, :-1].to(device, non_blocking=True), t[:, 1:].to(device, non_blocking=True))
                      for t in batch])
        loss = self.engine.train_batch(micro)
        extra: dict[str, float] = {}
        if self.model_state_gb is None and step >= 1:  # after the step: gradients are kept (ZeRO-1)
            self.model_state_gb = extra["memory/model_state_gb"] = model_state_bytes(self.engine) / 1024**3
        loss_sum = loss.detach().to(device, torch.float64) * len(batch)
        tokens = sum(t.shape[0] * (t.shape[1] - 1) for t in batch) if self.is_first_stage else 0
        return StepOutput(loss_sum, float(len(batch)), tokens, extra)

    def _validate(self, prefix: str, max_samples: int | None) -> dict[str, float] | None:
        """As :meth:`LanguageModelStep._validate`, each micro batch through ``eval_batch`` with a loss
        function that returns the micro batch's (nats, tokens, bytes) on the last stage."""
        try:
            return super()._validate(prefix, max_samples)
        finally:
            self.pipe.loss_fn = self.train_loss

    def _micro_batch_sums(self, tokens: torch.Tensor, keep: torch.Tensor,
                          byte_lengths: torch.Tensor | None) -> torch.Tensor | None:
        weight = head_weight_of(self.pipe, self.model_cfg)

        def sums(hidden: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            targets, rows = labels
            return next_token_sums(torch.nn.functional.linear(hidden, weight()), targets, rows, byte_lengths)

        self.pipe.loss_fn = sums
        # eval_batch adds each loss to the running training total (a scalar from train_batch, reset
        # only there), which a (3,) sum cannot be added to: start it afresh
        self.engine.total_loss = None
        out = self.engine.eval_batch(iter([(tokens[:, :-1], (tokens[:, 1:], keep))]), num_micro_batches=1,
                                     reduce_output=None, bcast_loss=False)
        return out[0].to(torch.float64) if self.is_last_stage else None
