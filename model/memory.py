"""Activation memory of a training step: an estimate from the shapes, and a CPU measurement.

:func:`estimate_activation_memory` counts, tensor by tensor, what our model code keeps for the
backward pass and the largest transient working sets on top of it; :func:`measure_activation_memory`
records every allocation of one real forward + backward on CPU with the torch profiler, so the
estimate is checked against the allocator (``tests/test_activation_memory.py``: within 20 %).

Notation: N = micro batch x sequence length tokens, C = dim, Q = n_heads x head_dim (= C),
K = kv_heads x head_dim, F = the SwiGLU hidden size, V = vocabulary, H = n_heads, s = bytes per
element of the training dtype (4 fp32, 2 bf16/fp16); RMSNorm works in fp32 (4 bytes) whatever s.

What one block keeps for backward when it is not recomputed (``S_block``), from
:mod:`model.transformer`:

- each of its two RMSNorms: its input upcast to fp32 (N C 4; in fp32 the input itself), the
  reciprocal RMS (N 4), the normalised value cast back to the dtype (N C s, read by the gain's
  backward) and the gained output (N C s, read by the weight gradients of the projections that
  follow): ``2 (N C (4 + 2 s) + 4 N)``;
- attention: the rotated queries and keys and the values (N (Q + 2 K) s), the attention output
  (N Q s; the flash kernels lay it out (B, T, H, D), so the reshape before ``wo`` is a view) and
  the log-sum-exp rows (N H 4). ``F.scaled_dot_product_attention(is_causal=True)`` picks flash
  attention both on CPU (``_scaled_dot_product_flash_attention_for_cpu``) and on GPU (bf16),
  and both save exactly q, k, v, out and logsumexp: no T x T matrix, and with grouped-query
  attention k and v keep their kv_heads. Rotary embedding saves nothing large (the cos/sin
  tables are T x head_dim and need no gradient);
- SwiGLU: the gate projection (input of silu), silu's output, the up projection and their
  product (input of ``w_down``): 4 N F s.

    S_block = N (2 C (4 + 2 s) + 8 + (2 Q + 2 K + 4 F) s + 4 H)

A recomputed (checkpointed) block keeps only its input, N C s. With ``activation_checkpointing``
k >= 1, blocks 0, k, 2k, ... are recomputed: ``n_ckpt = ceil(n_layers / k)``. The embedding
output is block 0's input and is counted there. The final RMSNorm keeps
``S_norm = N C (4 + s) + 4 N``.

    S_blocks = (n_layers - n_ckpt) S_block + n_ckpt N C s

The peak is the largest of three moments:

- loss forward, ``S_blocks + S_norm +`` the loss's working set. Chunked (``train.loss_chunk_tokens``
  = n > 0, :mod:`model.loss`): the final hidden states (N C s), the fp32 gradients the loss
  computes in forward and keeps (``G = N C 4 + V C 4``), one chunk's fp32 logits (n V 4) with,
  below fp32, their cast to the dtype (n V s), and the weight gradient of one chunk in the dtype
  (V C s) being added into the fp32 one: ``N C s + G + n V (4 + s') + V C s`` with s' = s below
  fp32 and 0 in fp32 (the cast is then the same tensor). On CPU only, that mixed-dtype in-place
  add first copies its bf16 operand to fp32 (+ V C 4; CUDA kernels cast on the fly).
  Full logits (n = 0): the hidden states, the fp32 logits and log-softmax's fp32 output:
  ``N C s + 2 N V 4``;
- loss backward, ``S_blocks + S_norm +``: chunked, the kept gradients, their scaled fp32 copies and
  below fp32 their casts to the dtype: ``2 G + (N C + V C) s'``; full logits: the hidden states,
  the saved log-softmax output, the gradient of the loss w.r.t. it and w.r.t. the logits, all
  fp32 over N x V: ``N C s + 3 N V 4``;
- the last block's backward, ``S_blocks +`` (the loss and the final norm are freed by then): the
  gradient of the residual stream (N C s), the gradients of SwiGLU's product and of both its
  factors at once while the product is already freed (net 2 N F s), and, when the last block is
  recomputed (``(n_layers - 1) % k == 0``), its ``S_block`` again less its input, which the
  checkpoint already keeps when the fp32 copy of it is the input itself (fp32: - N C 4). A
  recomputation is alive only during its own block's backward, so the first block to run
  backward (the last layer) sets this peak: every other block's tensors are still held.

Sequence parallelism over P ranks (DeepSpeed-Ulysses, ``train.sequence_parallel``): every
per-token term above holds the rank's N / P tokens, and attention, which runs over the whole
sequence for H / P heads after the all-to-all, keeps N (Q + 2 K) s / P, (N Q s) / P and N H 4 / P
bytes: the same formula at N / P tokens (``sequence_parallel``). A dense document mask
(``model.attention: document`` off CUDA) is B T^2 s on every rank, not divided, and not counted here
(FlexAttention's block mask on CUDA is small).

Tensor parallelism over T ranks (DeepSpeed AutoTP, ``train.tensor_parallel``): each rank holds
H / T query heads, kv_heads / T key/value heads and F / T of the SwiGLU width for all N tokens,
so the attention and SwiGLU terms of ``S_block`` (``N ((2 Q + 2 K + 4 F) s + 4 H)``) and the
SwiGLU gradients of the block backward (``2 N F s``) are divided by T; the norms, the residual
stream (the row-parallel outputs are all-reduced to full width), the checkpointed block inputs and
the loss (embedding and head replicated) are not (``tensor_parallel``).

Small terms (rotary tables, a few fp32 vectors per token) are left out; what the allocator holds
besides tensors (fragmentation, the CUDA caching allocator's reserve, NCCL buffers) is not part of
this estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import ModelConfig

FP32 = 4


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes of activations one rank holds during one micro batch's forward and backward."""

    block_bytes: int
    """What one block that is not recomputed keeps for backward (``S_block``)."""
    checkpointed_blocks: int
    """Blocks recomputed in backward (keeping only their input)."""
    blocks_bytes: int
    """What all blocks keep at the end of the forward pass (``S_blocks``)."""
    final_norm_bytes: int
    """What the final RMSNorm keeps (``S_norm``)."""
    loss_forward_bytes: int
    """Working set of the loss forward, on top of the blocks and the final norm."""
    loss_backward_bytes: int
    """Working set of the loss backward, on top of the blocks and the final norm."""
    block_backward_bytes: int
    """Working set of the last block's backward (with its recomputation), on top of the blocks."""

    def phases(self) -> dict[str, int]:
        """Total bytes at each candidate peak: ``loss forward``, ``loss backward``, ``block backward``."""
        kept = self.blocks_bytes + self.final_norm_bytes
        return {"loss forward": kept + self.loss_forward_bytes, "loss backward": kept + self.loss_backward_bytes,
                "block backward": self.blocks_bytes + self.block_backward_bytes}

    @property
    def peak_bytes(self) -> int:
        """The activation peak of the step."""
        return max(self.phases().values())

    @property
    def peak_phase(self) -> str:
        """The moment that sets the peak (a key of :meth:`phases`)."""
        phases = self.phases()
        return max(phases, key=phases.__getitem__)


def estimate_activation_memory(cfg: ModelConfig, micro_batch_size: int, seq_len: int, dtype_bytes: int,
                               loss_chunk_tokens: int, checkpoint_every: int | None = None,
                               device: str = "cuda", sequence_parallel: int = 1,
                               tensor_parallel: int = 1) -> ActivationMemory:
    """Activation bytes of one rank at the peak of a training step (the module docstring gives the
    formula and what each term is). ``checkpoint_every``: 0 none, k every k-th block from block 0;
    None takes ``cfg.activation_checkpointing``. ``loss_chunk_tokens`` 0: full fp32 logits.
    ``device`` "cpu" adds the copy CPU kernels make for a mixed-dtype in-place add.
    ``sequence_parallel`` P: one rank of a group that splits each sequence P ways (``seq_len`` is
    the whole sequence's). ``tensor_parallel`` T: one rank of a group that splits the heads and the
    SwiGLU width T ways (they must divide by T)."""
    if micro_batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"micro batch ({micro_batch_size}) and sequence length ({seq_len}) must be positive")
    if sequence_parallel <= 0 or seq_len % sequence_parallel:
        raise ValueError(f"sequence_parallel ({sequence_parallel}) must be positive and divide the sequence "
                         f"length ({seq_len})")
    if tensor_parallel <= 0 or cfg.n_heads % tensor_parallel or cfg.kv_heads % tensor_parallel \
            or cfg.hidden_dim % tensor_parallel:
        raise ValueError(f"tensor_parallel ({tensor_parallel}) must be positive and divide n_heads ({cfg.n_heads}), "
                         f"kv_heads ({cfg.kv_heads}) and the SwiGLU width ({cfg.hidden_dim})")
    if dtype_bytes not in (2, FP32):
        raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")
    every = cfg.checkpoint_every if checkpoint_every is None else checkpoint_every
    if every < 0:
        raise ValueError(f"checkpoint_every must be 0 (none) or a block interval k >= 1, got {every}")
    n, s = micro_batch_size * seq_len // sequence_parallel, dtype_bytes  # this rank's tokens
    C, Q, K, F = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    V, H, L = cfg.vocab_size, cfg.n_heads, cfg.n_layers
    narrower = s if s != FP32 else 0  # a cast to the dtype is a new tensor only below fp32

    tp = tensor_parallel  # this rank's share of the heads and of the SwiGLU width (exact: they divide)
    block = n * (2 * C * (FP32 + 2 * s) + 2 * FP32 + ((2 * Q + 2 * K + 4 * F) * s + FP32 * H) // tp)
    recomputed = math.ceil(L / every) if every else 0
    blocks = (L - recomputed) * block + recomputed * n * C * s
    final_norm = n * C * (FP32 + s) + FP32 * n
    if loss_chunk_tokens:
        chunk = min(loss_chunk_tokens, n)
        kept = n * C * FP32 + V * C * FP32
        loss_forward = n * C * s + kept + chunk * V * (FP32 + narrower) + V * C * s
        if device == "cpu" and narrower:
            loss_forward += V * C * FP32
        loss_backward = 2 * kept + (n * C + V * C) * narrower
    else:
        loss_forward = n * C * s + 2 * n * V * FP32
        loss_backward = n * C * s + 3 * n * V * FP32
    block_backward = n * C * s + 2 * n * F * s // tp
    if every and (L - 1) % every == 0:
        block_backward += block - (n * C * FP32 if s == FP32 else 0)
    return ActivationMemory(block_bytes=block, checkpointed_blocks=recomputed, blocks_bytes=blocks,
                            final_norm_bytes=final_norm, loss_forward_bytes=loss_forward,
                            loss_backward_bytes=loss_backward, block_backward_bytes=block_backward)


def measure_activation_memory(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                              loss_chunk_tokens: int) -> int:
    """Peak bytes the CPU allocator holds beyond what existed before, during one training forward
    + backward of ``model`` (a :class:`model.transformer.Transformer` on CPU) on ``tokens``.

    Every parameter gets a zero gradient first, so the step accumulates into existing gradient
    buffers (as every step after the first, and as DeepSpeed's buffers): what is measured is the
    activations and the transient gradients, not the model state. The torch profiler's memory
    events are every allocation and free of the CPU allocator, kernel scratch space included,
    which a count of the tensors saved for backward would miss (and non-reentrant checkpointing
    hides saved tensors behind its own hooks).
    """
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(tokens, targets=targets, loss_chunk_tokens=loss_chunk_tokens)
        loss.backward()
        del loss
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak
