"""AdamW parameter groups and the step-skipping optimizer (the learning rate of each step comes
from :mod:`training.schedule`; the loop sets it on every step)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from training.collectives import true_on_every_rank
from training.config import OptimConfig


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices decayed; norms, biases and (by default) embeddings not.

    Embeddings are recognised as parameters of ``nn.Embedding`` modules.
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # ZeRO-3 partitions parameters in place; ds_shape keeps the logical shape
        ndim = len(getattr(p, "ds_shape", p.shape))
        is_matrix = ndim >= 2 and id(p) not in embedding_params
        if is_matrix or (optim.decay_norms_and_embeddings and ndim >= 1):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of ``tensors`` is finite. One fused multi-tensor norm per
    device and dtype and no host sync (a finite tensor whose norm overflows counts as non-finite:
    values beyond ~1e19 in fp32, a step to skip anyway)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, foreach=True))


class SkippingAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that skips a step whose gradients are non-finite on any rank.

    DeepSpeed checks for overflow only in fp16; in fp32/bf16 one NaN gradient would poison the
    weights. ZeRO hands this optimizer the (clipped) gradients of each rank's partition, so the
    check (one fused reduction, see :func:`all_finite`) all-reduces one flag and every rank skips
    or steps together. ``skipped_steps`` counts
    the skipped steps; ``last_step_skipped`` tells the trainer about the current one.
    """

    def __init__(self, params: Iterable[Any], clip_grad: float | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.skipped_steps = 0
        self.last_step_skipped = False
        # Without ZeRO (stage 0) the engine neither reports the gradient norm nor clips before
        # this step sees full gradients; then this optimizer clips and records the norm itself
        # (DeepSpeed's engine reads ``_global_grad_norm`` from its optimizer).
        self.clip_grad = clip_grad
        if clip_grad is not None:
            self._global_grad_norm: float | None = None

    def _clip(self) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        # kept as a tensor: the loop reads it with the step's other numbers (one host sync)
        self._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def _all_grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return true_on_every_rank(all_finite(grads))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.clip_grad is not None:
            self._clip()
        if not self._all_grads_finite():
            self.skipped_steps += 1
            self.last_step_skipped = True
            return None
        self.last_step_skipped = False
        return super().step(closure)


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig, zero_stage: int) -> SkippingAdamW:
    """A :class:`SkippingAdamW` over ``groups`` (see :func:`param_groups`).

    ``foreach`` is used on every device; ``fused`` is not (it is not bit-stable across resume
    on CPU). Without ZeRO the optimizer clips (DeepSpeed does not hand it clipped gradients).
    """
    return SkippingAdamW(
        groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        weight_decay=optim.weight_decay, foreach=True,
        clip_grad=optim.grad_clip if zero_stage == 0 else None,
    )
