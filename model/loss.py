"""Next-token cross-entropy from hidden states without materialising the (N, vocab) fp32 logits.

``F.cross_entropy(F.linear(hidden, W).float(), targets)`` holds the logits of every token in the
model dtype and again in fp32, plus their gradient: at micro batch 8 x 2048 tokens and a 32k
vocabulary that is ~6 GB in fp32 alone. :func:`chunked_cross_entropy` walks the tokens in chunks of
``chunk_tokens``: for each, logits = chunk @ W^T in the model dtype, upcast to fp32, log-softmax,
and, when a gradient is wanted, the chunk's gradients w.r.t. the hidden states and W right away
(as Liger's fused linear + cross-entropy does). No chunk's logits outlive its iteration, so the
live logits are bounded by one chunk (``chunk_tokens x vocab``) and nothing of size N x vocab is
saved for backward; backward only scales the stored gradients by the incoming one. Computing
the gradients in forward costs no extra matmul (recomputing the logits in backward would cost
one more per chunk).

The stored gradients are kept unscaled (``softmax - one_hot``, not divided by the token count)
in fp32 and scaled in backward, so a loss scale (fp16) is applied before anything is rounded to
the model dtype, as in the full-logits path.
"""

from __future__ import annotations

from typing import Any

import torch


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int, want_grad: bool) -> torch.Tensor:
        n_tokens = hidden.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = grad_weight = None
        if want_grad and ctx.needs_input_grad[0]:
            grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)  # (N, C)
        if want_grad and ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, C)
        for start in range(0, n_tokens, chunk_tokens):
            h = hidden[start:start + chunk_tokens]  # (n, C)
            t = targets[start:start + chunk_tokens]  # (n,)
            logits = (h @ weight.t()).float()  # (n, V): model-dtype matmul, fp32 softmax
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            loss_sum += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h
        ctx.n_tokens = n_tokens
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None and grad_weight is None and any(ctx.needs_input_grad[:2]):
            raise RuntimeError("chunked_cross_entropy was called with want_grad=False; "
                               "call it with gradients enabled to backpropagate through it")
        scale = grad_loss.float() / ctx.n_tokens
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_hidden is None else (grad_hidden * scale).to(hidden_dtype),
                None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
                None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (..., C) @ weight (V, C)^T`` against ``targets (...)``.

    Equals ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten())``
    in value and in the gradients w.r.t. ``hidden`` and ``weight`` (within rounding; the loss is
    an fp32 scalar), while at most ``chunk_tokens x V`` logits are alive at a time. Every target
    counts (no ignore index: packed sequences have no padding).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive (got {chunk_tokens})")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape)}")
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                      chunk_tokens, want_grad)
