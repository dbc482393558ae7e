"""Which keys each query may see: causal or document attention over packed samples.

A packed training sample concatenates documents, each ending with the EOS token, and cuts the
stream every ``seq_len`` tokens. Causal attention (``model.attention: causal``) lets a token see
every earlier token of the sample, documents before its own included. Document attention
(``model.attention: document``) lets it see only the earlier tokens of its own document.

Everything derives from document ids (B, T), :func:`document_ids` of the tokens: the mask is one
predicate, :func:`document_mask_mod` (FlexAttention's ``mask_mod`` signature), that
:func:`build_document_mask` evaluates either into

- a FlexAttention ``BlockMask`` (kernel ``flex``, the default on CUDA): only which 128 x 128
  tiles are empty, full or partial, so no T x T tensor exists and the kernel skips empty tiles
  (the work falls with the documents' lengths); or
- a dense additive (B, 1, T, T) mask in the activations' dtype (0 where a key may be seen,
  -inf elsewhere) for ``F.scaled_dot_product_attention`` (kernel ``dense``, the default
  elsewhere): B T^2 s bytes built once per forward and shared by every layer. Additive and in
  the dtype, because a boolean mask is converted to one by every attention call, and each
  layer would keep its own copy for the backward pass.

Both are evaluated from the same predicate, so they agree by construction, and :func:`attend`
runs attention with either. The functions take tokens or document ids only, not the model, so
code that shards the sequence (sequence parallelism) can derive the ids of the whole sequence
first and slice them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5: no FlexAttention, the dense kernel only
    BlockMask = create_block_mask = flex_attention = None

Kernel = Literal["flex", "dense"]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DocumentMask = Any
"""A dense additive (B, 1, T, T) float tensor or a FlexAttention ``BlockMask``."""

_compiled: dict[str, Callable] = {}


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int32: the index of the document each token belongs to within its row, counted
    from 0. A document ends with (and includes) its EOS token: the count of EOS tokens strictly
    before a position."""
    is_eos = (tokens == eos_id).to(torch.int32)  # (B, T)
    return torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each token's position within its document (0 at the document's first token
    in the row; a document cut by the start of the row starts at 0 there)."""
    B, T = doc_ids.shape
    index = torch.arange(T, device=doc_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    return index - first


def document_mask_mod(doc_ids: torch.Tensor) -> MaskMod:
    """The predicate ``(batch, head, q_idx, kv_idx) -> may attend``: the key is not after the
    query and both are in the same document (FlexAttention's ``mask_mod``; also evaluated on
    broadcast index tensors by :func:`dense_document_mask`)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: :func:`document_mask_mod` evaluated at every (query, key) pair."""
    B, T = doc_ids.shape
    device = doc_ids.device
    b = torch.arange(B, device=device)[:, None, None, None]
    q_idx = torch.arange(T, device=device)[None, None, :, None]
    kv_idx = torch.arange(T, device=device)[None, None, None, :]
    return document_mask_mod(doc_ids)(b, None, q_idx, kv_idx)


def default_kernel(device: torch.device) -> Kernel:
    """``flex`` on CUDA (when this torch has FlexAttention), ``dense`` elsewhere: FlexAttention
    needs ``torch.compile`` to be fast, and its compiled CPU kernel costs many seconds to build
    for a small model, where the dense mask is cheap."""
    return "flex" if device.type == "cuda" and flex_attention is not None else "dense"


def build_document_mask(doc_ids: torch.Tensor, kernel: Kernel | None = None,
                        dtype: torch.dtype = torch.float32) -> DocumentMask:
    """The document mask of ``doc_ids`` (B, T) for :func:`attend`: a ``BlockMask`` (``flex``) or
    a dense additive mask of ``dtype``, the attention inputs' (``dense``); ``kernel`` None:
    :func:`default_kernel` of the ids' device."""
    kernel = kernel or default_kernel(doc_ids.device)
    if kernel == "dense":
        visible = dense_document_mask(doc_ids)  # (B, 1, T, T)
        return torch.zeros(visible.shape, dtype=dtype, device=doc_ids.device).masked_fill_(~visible, -math.inf)
    if create_block_mask is None:
        raise RuntimeError(f"the flex attention kernel needs torch >= 2.5 (FlexAttention); this is torch "
                           f"{torch.__version__}: upgrade torch or use the dense kernel")
    B, T = doc_ids.shape
    build = _compiled_fn("create_block_mask", create_block_mask) if doc_ids.is_cuda else create_block_mask
    return build(document_mask_mod(doc_ids), B, None, T, T, device=doc_ids.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None,
           enable_gqa: bool) -> torch.Tensor:
    """Attention output (B, H, T, D) of ``q`` (B, H, T, D) over ``k``/``v`` (B, KV, T, D):
    causal when ``mask`` is None, else restricted by a mask from :func:`build_document_mask`."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if BlockMask is not None and isinstance(mask, BlockMask):
        flex = _compiled_fn("flex_attention", flex_attention) if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _compiled_fn(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)``, made once: eager FlexAttention materialises the T x T scores, the
    compiled one is a fused kernel (inside a compiled block Dynamo inlines the call)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]
