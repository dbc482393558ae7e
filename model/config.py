"""Model configuration and size presets."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from crucible.config import Section


class ModelConfig(Section):
    """Decoder-only Llama-style Transformer shape (section ``model``)."""

    preset: str | None = None
    """Named size preset (tiny, cpu-small, 125M, 350M, 1.3B, 7B, 13B, 70B); explicit keys set here override it."""
    vocab_size: int = 32000
    """Vocabulary size; taken from the tokenizer by the stages that have one."""
    dim: int = 256
    """Hidden size."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means n_heads (multi-head attention)."""
    ffn_dim: int | None = None
    """SwiGLU hidden size; null means 8/3 * dim rounded up to ffn_multiple_of."""
    ffn_multiple_of: int = 64
    """Rounding multiple for the derived SwiGLU hidden size."""
    max_seq_len: int = 256
    """Longest sequence (context) the model is trained or used with."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weight matrices."""
    init_depth_scaled: bool = True
    """Scale the residual output projections' init by 1/sqrt(2 * n_layers)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype when the model is built outside DeepSpeed (generation, export)."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        kv = self.n_kv_heads or self.n_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({kv})"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")
        return self
