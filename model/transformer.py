"""Decoder-only Llama Transformer as one plain ``nn.Module``.

RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention through
``F.scaled_dot_product_attention``, no biases, optional tied embeddings. No distributed code.

Rotary layout: like Hugging Face's Llama (and unlike Meta's original checkpoint format), a head's
dimensions are rotated as pairs ``(i, i + head_dim/2)`` ("rotate_half"), so conversion to and
from ``LlamaForCausalLM`` is a pure renaming of tensors with no row permutation.

Construction: every leaf module initialises its own parameters in its constructor (so
``deepspeed.zero.Init`` partitions weights that are already initialised, module by module, and no
rank ever holds the whole model).

Sequence parallelism (DeepSpeed-Ulysses, :meth:`Transformer.enable_sequence_parallel`): each rank of
a group gets the whole sample, derives the document ids, rotary positions and mask of the whole
sequence, and runs only its chunk ``[r T / N, (r + 1) T / N)``; attention exchanges heads for
sequence with an all-to-all (``deepspeed.sequence.layer.DistributedAttention``), so each rank
attends over the whole sequence for ``n_heads / N`` heads. Built under ``torch.device("meta")``, ``to_empty(device=...)``
followed by :meth:`Transformer.init_weights` gives the same weights as building on the device
directly, for the same torch seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from crucible.errors import ConfigError
from model.attention import (
    DocumentMask,
    attend,
    build_document_mask,
    document_ids,
    document_positions,
)
from model.config import ModelConfig
from model.loss import chunked_cross_entropy
from model.rope import rope_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def normal_init_(weight: torch.Tensor, std: float) -> None:
    """``weight`` <- N(0, std) drawn from torch's CPU generator whatever the weight's device, so
    the same seed gives the same weights on CPU and GPU (and under ``deepspeed.zero.Init``); one
    parameter at a time passes through host memory, never the whole model."""
    if weight.device.type in ("cpu", "meta"):
        nn.init.normal_(weight, mean=0.0, std=std)
    else:
        with torch.no_grad():
            weight.copy_(torch.empty(weight.shape, dtype=weight.dtype, device="cpu").normal_(0.0, std))


class Linear(nn.Module):
    """Bias-free linear layer, initialised N(0, std) in its constructor.

    ``weight`` given: the layer shares that parameter (tied output head) and never
    re-initialises it.
    """

    def __init__(self, in_features: int, out_features: int, std: float,
                 weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.std = std
        self.tied = weight is not None
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(out_features, in_features))
        # no bias; registered as None (absent from the state dict) because DeepSpeed's AutoTP
        # layers read ``module.bias`` when they shard this layer (train.tensor_parallel)
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.tied:
            normal_init_(self.weight, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class OutputHead(Linear):
    """The output head: logits, or with ``targets`` the mean next-token cross-entropy.

    The loss is computed inside this module's forward so that under DeepSpeed ZeRO-3, which
    gathers a partitioned weight only for the forward of the module that owns it, the weight
    (tied or not) is whole while the loss reads it.
    """

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                chunk_tokens: int | None = None, total_tokens: int | None = None) -> torch.Tensor:
        """``total_tokens`` given (sequence parallelism): the sum of these tokens' losses divided
        by ``total_tokens``, the token count of the whole micro batch, instead of their mean."""
        if targets is None:
            return F.linear(x, self.weight)  # (B, T, V)
        loss = next_token_loss(x, self.weight, targets, chunk_tokens)
        return loss if total_tokens is None else loss * (targets.numel() / total_tokens)


def next_token_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk_tokens: int | None) -> torch.Tensor:
    """Mean cross-entropy (fp32) of the logits ``x @ weight.T`` against ``targets``: computed
    ``chunk_tokens`` tokens at a time (:mod:`model.loss`), or from the full logits (None or 0)."""
    if chunk_tokens:
        return chunked_cross_entropy(x, weight, targets, chunk_tokens)
    return F.cross_entropy(F.linear(x, weight).float().flatten(0, -2), targets.flatten())


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, std: float) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        normal_init_(self.weight, self.std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, gain applied in the input dtype (as Hugging Face's Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, so that ``rotate_half(x) * sin`` becomes
    ``swap_halves(x) * signed_sin(sin)``: the same products (negation is exact)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotation: (x1, x2) -> (-x2, x1) on the halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by position: pairs (i, i + D/2) as one complex number.
    Equals ``x * cos + rotate_half(x) * sin`` bit for bit; ``sin`` must be :func:`signed_sin`'s.

    Swapping the halves with one ``flip`` of a (2, D/2) view avoids the slices and the
    concatenation of ``rotate_half``, whose backward fills and copies zero tensors.
    """
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos + swapped * sin


@dataclass
class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    ``k[layer]``/``v[layer]``: (B, n_kv_heads, capacity, head_dim); ``length`` positions are filled.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, capacity: int,
              device: torch.device | str, dtype: torch.dtype) -> KVCache:
        shape = (batch_size, cfg.kv_heads, capacity, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std)
        self.wk = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wv = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, out_std)
        # DeepSpeed's DistributedAttention around attend() under sequence parallelism; a plain
        # attribute, not a submodule (it has no parameters and must not enter the state dict)
        object.__setattr__(self, "sequence_parallel", None)

    def enable_sequence_parallel(self, group: Any) -> None:
        """Attend through an all-to-all over ``group``: the inputs are this rank's chunk of the
        sequence with every head; attention runs over the whole sequence with this rank's share of
        the heads (query heads and key/value heads in contiguous blocks, so each query head stays
        with its key/value group when both counts divide by the group size)."""
        from deepspeed.sequence.layer import DistributedAttention

        def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: DocumentMask | None) -> torch.Tensor:  # (B, T, h, D) in and out
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, q.shape[2] != k.shape[2])
            return out.transpose(1, 2)

        # (B, T, H, D) layout: scatter the heads (dim 2), gather the sequence (dim 1)
        object.__setattr__(self, "sequence_parallel",
                           DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                mask: DocumentMask | None = None) -> torch.Tensor:
        """Without ``cache``: causal attention, or restricted by a document ``mask``
        (:func:`model.attention.build_document_mask`). With ``cache``: ``mask`` is the boolean
        (B, 1, T, cache length) mask of the cached keys each query may see."""
        # head counts come from the projections' widths, not n_heads/n_kv_heads: under tensor
        # parallelism (DeepSpeed AutoTP) wq/wk/wv hold this rank's n_heads/T and kv_heads/T heads
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotated at their own positions
        gqa = k.shape[1] != q.shape[1]
        if cache is None and self.sequence_parallel is not None:
            out = self.sequence_parallel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, mask)
            return self.wo(out.reshape(B, T, -1))  # out: (B, T, H, D)
        if cache is None:
            out = attend(q, k, v, mask, gqa)  # (B, H, T, D)
        else:
            k_cache, v_cache, start = cache
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
            if gqa:  # masked GQA is not supported by every sdpa kernel: expand the heads
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.wo(out)


class MLP(nn.Module):
    """SwiGLU: ``w_down(silu(w_gate x) * w_up x)``."""

    def __init__(self, cfg: ModelConfig, out_std: float) -> None:
        super().__init__()
        self.w_gate = Linear(cfg.dim, cfg.hidden_dim, cfg.init_std)
        self.w_up = Linear(cfg.dim, cfg.hidden_dim, cfg.init_std)
        self.w_down = Linear(cfg.hidden_dim, cfg.dim, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.init_depth_scaled else cfg.init_std
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, out_std)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                mask: DocumentMask | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The language model: ``forward(tokens (B, T)) -> logits (B, T, vocab_size)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.attention == "document" and cfg.eos_id is None:
            raise ConfigError("model.attention=document needs model.eos_id, the token that ends each "
                              "document in a packed sample: set it (pretraining fills it from the token "
                              "shards' tokenizer) or set model.attention=causal")
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        tied = self.embed.weight if cfg.tie_embeddings else None
        self.lm_head = OutputHead(cfg.dim, cfg.vocab_size, cfg.init_std, weight=tied)
        self.sp_rank, self.sp_size = 0, 1

    def enable_sequence_parallel(self, group: Any) -> None:
        """Split every training/scoring forward's sequence over the ranks of ``group`` (a
        ``torch.distributed`` group; every rank of it passes the same tokens): see the module
        docstring. Incremental decoding (a ``cache``) is not split."""
        import torch.distributed as dist

        self.sp_rank, self.sp_size = dist.get_rank(group), dist.get_world_size(group)
        for layer in self.layers:
            layer.attn.enable_sequence_parallel(group)

    def sequence_chunk(self, length: int) -> slice:
        """This rank's positions ``[r T / N, (r + 1) T / N)`` of a sequence of ``length`` tokens."""
        size = length // self.sp_size
        return slice(self.sp_rank * size, (self.sp_rank + 1) * size)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter in construction order, so the same torch seed gives
        the same weights as construction on a real device:

        - token embedding, q/k/v projections, SwiGLU gate and up projections, untied output
          head: N(0, init_std);
        - the residual output projections (attention ``wo``, MLP ``w_down``):
          N(0, init_std / sqrt(2 * n_layers)) with ``init_depth_scaled``, else N(0, init_std);
        - RMSNorm gains: 1.

        Also re-ties the output head to the embedding (``to_empty`` unties shared parameters).
        The model has no buffers: rotary tables are computed in fp32 in each forward pass.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when ``tie_embeddings`` (needed again after
        ``to_empty`` or ``load_state_dict(assign=True)``, which untie shared parameters)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
            self.lm_head.tied = True

    def forward(self, tokens: torch.Tensor, *, targets: torch.Tensor | None = None,
                loss_chunk_tokens: int | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: DocumentMask | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for ``tokens`` (B, T); other arguments as :meth:`hidden_states`.

        With ``targets`` (B, T): the mean cross-entropy (fp32 scalar) of the logits against them
        instead, computed ``loss_chunk_tokens`` tokens at a time (see :mod:`model.loss`) so the
        (B*T, vocab_size) fp32 logits never exist; None or 0: from the full logits.

        Sequence parallel (:meth:`enable_sequence_parallel`, no ``cache``): the logits of this
        rank's chunk only (B, T / N, V); with ``targets``, the sum of this chunk's token losses over
        the B T tokens of the whole micro batch (the group's sum is the mean over the sequence).
        """
        hidden = self.hidden_states(tokens, positions=positions, cache=cache, mask=mask)  # (B, T, C)
        if targets is None:
            return self.lm_head(hidden)  # (B, T, V)
        if self.sp_size > 1 and cache is None:
            chunk = targets[:, self.sequence_chunk(targets.shape[1])]
            return self.lm_head(hidden, chunk, loss_chunk_tokens, total_tokens=targets.numel())
        return self.lm_head(hidden, targets, loss_chunk_tokens)

    def hidden_states(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, mask: DocumentMask | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim) for ``tokens`` (B, T): what the output head
        and the task heads read.

        Training/scoring: only ``tokens``; attention is causal over the sequence, or with
        ``model.attention: document`` restricted to each token's document (documents end at
        ``eos_id``; rotary positions restart at each document).
        ``positions`` and a document ``mask`` given (code that splits the sequence) replace the
        ones derived from ``tokens``. Sequence parallel: ``tokens``, ``positions`` and ``mask`` are
        the whole sequence's; the hidden states returned are this rank's chunk (B, T / N, dim). Incremental decoding (see :mod:`model.generate`), always
        causal: ``positions`` (B, T), ``cache`` (appended to at ``cache.length``, which then
        advances by T) and a boolean ``mask`` (B, 1, T, cache length + T) of the keys each query
        may see.
        """
        T = tokens.shape[1]
        if cache is None and mask is None and self.cfg.attention == "document":
            # whole sequence: heads are local after sequence parallelism's all-to-all
            mask, doc_positions = document_inputs(self.cfg, tokens, self.embed.weight.dtype)
            positions = doc_positions if positions is None else positions
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        if self.sp_size > 1 and cache is None:  # this rank's chunk of the sequence
            chunk = self.sequence_chunk(T)
            tokens, positions = tokens[:, chunk], positions[..., chunk]
            T = tokens.shape[1]
        x = self.embed(tokens)  # (B, T, C)
        cos, sin = rotary_inputs(self.cfg, positions, x.dtype)
        every = self.cfg.checkpoint_every if self.training and torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.length)
            if every and i % every == 0:  # blocks 0, k, 2k, ... recompute in backward
                x = checkpoint(layer, x, cos, sin, layer_cache, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_cache, mask)
        if cache is not None:
            cache.length += T
        return self.norm(x)  # (B, T, C)


def document_inputs(cfg: ModelConfig, tokens: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[DocumentMask, torch.Tensor]:
    """With ``model.attention: document``: the document mask of the packed ``tokens`` (B, T) and
    each token's position within its document (B, T)."""
    doc_ids = document_ids(tokens, cfg.eos_id)  # (B, T)
    return build_document_mask(doc_ids, dtype=dtype), document_positions(doc_ids)


def rotary_inputs(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and signed sin (:func:`signed_sin`) tables the blocks take for ``positions`` (T,)
    or (B, T): (T, D), or (B, 1, T, D) to broadcast over the heads."""
    cos, sin = rope_tables(cfg, positions, dtype)  # (T, D) or (B, T, D)
    sin = signed_sin(sin)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def build_transformer(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None,
                      dtype: torch.dtype | None = None) -> Transformer:
    """A model with initialised weights on ``device`` (``seed`` given: seeded torch RNG), built on
    the meta device and materialised there: no full copy in host memory, and the same weights
    for the same seed on every device (see :func:`normal_init_`)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype or DTYPES[cfg.dtype])
