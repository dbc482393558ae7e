"""How tensor parallelism (``train.tensor_parallel``, DeepSpeed AutoTP training) splits the
Transformer's parameters, in one place: the AutoTP ``partition_config`` that DeepSpeed applies
inside ``deepspeed.initialize``, and :func:`partition_dim`, the axis along which the per-rank
shards of a saved parameter are concatenated back (model directory / Hugging Face export).

Megatron's split of a Llama block: the query, key, value, gate and up projections are
column-parallel (each rank holds ``1/T`` of their output rows, so ``n_heads/T`` query heads,
``kv_heads/T`` key/value heads and ``hidden_dim/T`` of the MLP width), the attention output and
down projections are row-parallel (``1/T`` of their input columns, partial outputs summed by an
all-reduce). The embedding, the output head and every norm stay whole on each rank (replicated;
DeepSpeed all-reduces their gradients over the tensor-parallel group).
"""

from __future__ import annotations

import re
from typing import Any

COLUMN_PATTERNS = (r".*\.attn\.w[qkv]\.weight$", r".*\.mlp\.w_(gate|up)\.weight$")
"""Parameters split by output rows (dim 0 of the ``(out, in)`` weight)."""

ROW_PATTERNS = (r".*\.attn\.wo\.weight$", r".*\.mlp\.w_down\.weight$")
"""Parameters split by input columns (dim 1 of the ``(out, in)`` weight)."""

PARTITION_CONFIG: dict[str, Any] = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": list(COLUMN_PATTERNS), "partition_type": "column"},
        {"patterns": list(ROW_PATTERNS), "partition_type": "row"},
    ],
}
"""The ``tensor_parallel.partition_config`` block of the DeepSpeed config (AutoTP's configurable
layer specs, matched against ``module.weight`` names); anything not matched stays replicated."""

_COLUMN = tuple(re.compile(p) for p in COLUMN_PATTERNS)
_ROW = tuple(re.compile(p) for p in ROW_PATTERNS)


def partition_dim(param_name: str) -> int | None:
    """The dimension along which ``param_name``'s tensor-parallel shards are concatenated: 0 for
    column-parallel weights, 1 for row-parallel ones, None for replicated parameters (every rank
    holds the whole tensor). ``param_name`` is a name of :meth:`Transformer.named_parameters`
    (a leading ``module.`` or other prefix is allowed)."""
    if any(p.match(param_name) for p in _COLUMN):
        return 0
    if any(p.match(param_name) for p in _ROW):
        return 1
    return None


def split_params(cfg: Any) -> int:
    """Parameters of ``cfg`` (a :class:`model.config.ModelConfig`) that tensor parallelism splits T
    ways: every block's seven projections (the norms, the embedding and the head stay whole)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return cfg.n_layers * (2 * cfg.dim * q + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.hidden_dim)


def params_per_rank(cfg: Any, tensor_parallel: int) -> int:
    """Parameters one rank holds under ``tensor_parallel`` (T divides the split dimensions)."""
    from model.flops import num_params

    split = split_params(cfg)
    return num_params(cfg) - split + split // tensor_parallel
