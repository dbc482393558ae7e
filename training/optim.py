"""AdamW parameter groups and the step-skipping optimizer (the learning rate of each step comes
from :mod:`training.schedule`; the loop sets it on every step)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from model.transformer import Embedding
from training.collectives import true_on_every_rank
from training.config import OptimConfig

# the module types whose parameters are embeddings: torch's and the Transformer's own
EMBEDDING_MODULES: tuple[type[torch.nn.Module], ...] = (torch.nn.Embedding, Embedding)


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups as the README documents them: weight matrices decayed (``optim.weight_decay``);
    norm gains, biases and embeddings not (weight decay 0), unless
    ``optim.decay_norms_and_embeddings``, which decays every parameter with at least one dimension.

    Embeddings are the parameters of the modules of :data:`EMBEDDING_MODULES` (``nn.Embedding`` and
    the Transformer's :class:`model.transformer.Embedding`); norm gains and biases are the
    parameters with fewer than two dimensions (RMSNorm gains, the biases of task heads). A tied
    output head shares the embedding's parameter: it is one parameter, listed once (in the
    undecayed group, as an embedding); an untied output head is a weight matrix and is decayed.
    Parameters keep the order of ``model.named_parameters()`` within each group, which fixes the
    layout of the optimizer state in checkpoints.
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, EMBEDDING_MODULES) for p in m.parameters()
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


def adamw_kwargs(device_type: str, dtypes: Iterable[torch.dtype] = (torch.float32,)) -> dict[str, bool]:
    """Which torch AdamW implementation steps tensors of ``dtypes`` on ``device_type``.

    CUDA: ``fused`` (one kernel per parameter group instead of a dozen multi-tensor launches;
    torch fuses every floating dtype there). GPU runs promise no bit-exact resume anyway (cuBLAS
    and attention kernels are not bit-deterministic), so nothing is lost. Everywhere else, and
    for the host-side partitions of an offloaded optimizer: ``foreach``, which keeps a resumed CPU
    run's losses bit for bit equal to an uninterrupted one (the exact-resume tests); the CPU fused
    kernel is not bit-stable across a resume.
    """
    if device_type == "cuda" and all(d.is_floating_point for d in dtypes):
        return {"fused": True, "foreach": False}
    return {"fused": False, "foreach": True}


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
        self._implementation_chosen = False
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

    def _choose_implementation(self) -> None:
        """Set fused or foreach per group from the tensors this optimizer really updates: after
        ``deepspeed.initialize`` those are ZeRO's fp32 partitions, on the host when the optimizer
        is offloaded even though the model is on a GPU."""
        for group in self.param_groups:
            tensors = group["params"]
            device_types = {t.device.type for t in tensors}
            device_type = device_types.pop() if len(device_types) == 1 else "mixed"
            group.update(adamw_kwargs(device_type, {t.dtype for t in tensors}))
        self._implementation_chosen = True

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
        if not self._implementation_chosen:
            self._choose_implementation()
        return super().step(closure)


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig, zero_stage: int) -> SkippingAdamW:
    """A :class:`SkippingAdamW` over ``groups`` (see :func:`param_groups`).

    Built with ``foreach``; the first step switches each group to the implementation of
    :func:`adamw_kwargs` for the device its tensors are on then (``fused`` on CUDA). Without ZeRO
    the optimizer clips (DeepSpeed does not hand it clipped gradients).
    """
    return SkippingAdamW(
        groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        weight_decay=optim.weight_decay, foreach=True,
        clip_grad=optim.grad_clip if zero_stage == 0 else None,
    )
