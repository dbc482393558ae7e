"""Exact parameter count and training FLOPs per token, for MFU.

FLOPs count matrix multiplications only (2 FLOPs per multiply-add), as
``torch.utils.flop_counter.FlopCounterMode`` and the PaLM paper's MFU do: per token, the forward
pass costs ``2 * N_matmul`` for the weight matrices (every projection plus the output head, tied
or not; the embedding lookup is free) and ``4 * seq_len * n_heads * head_dim`` per layer for
attention (scores ``q k^T`` and the weighted sum of values, over the full ``seq_len`` context: the
causal half is not discounted, matching PaLM's ``6N + 12 L H Q T``). Training (forward +
backward) is 3x the forward pass.
"""

from __future__ import annotations

from model.config import ModelConfig


def _layer_matmul_params(cfg: ModelConfig) -> int:
    attn = cfg.dim * cfg.n_heads * cfg.head_dim * 2  # wq, wo
    attn += cfg.dim * cfg.kv_heads * cfg.head_dim * 2  # wk, wv
    mlp = 3 * cfg.dim * cfg.hidden_dim  # w_gate, w_up, w_down
    return attn + mlp


def num_params(cfg: ModelConfig) -> int:
    """Number of distinct parameters (a tied output head counted once)."""
    per_layer = _layer_matmul_params(cfg) + 2 * cfg.dim  # + two RMSNorm gains
    embed = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return embed + cfg.n_layers * per_layer + cfg.dim + head


def num_matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix multiplication per token (the output head always
    does; the embedding table does not)."""
    return cfg.n_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.dim


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attention = 4 * seq_len * cfg.n_heads * cfg.head_dim * cfg.n_layers
    return float(2 * num_matmul_params(cfg) + attention)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), attention included."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
