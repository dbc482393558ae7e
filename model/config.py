"""Model configuration and size presets.

A preset names a shape; keys written next to it win. The preset is applied when the config is
validated (a ``mode="before"`` validator fills the keys the recipe did not set), so a config
object always holds concrete numbers, and dumping it to YAML and loading it back gives the same
model. :func:`resolve_model_config` additionally puts in the tokenizer's vocabulary size.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ModelWrapValidatorHandler, model_validator

from crucible.config import Section
from crucible.errors import ConfigError

# Llama-2-style shapes. 125M/350M/1.3B follow the GPT-3 paper's widths and depths with the
# Llama block (SwiGLU at 8/3 * dim, RMSNorm, RoPE); 7B/13B/70B are Llama 2's shapes.
# vocab_size is not part of a preset: it comes from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_multiple_of": 32,
             "max_seq_len": 128},
    "cpu-small": {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "ffn_multiple_of": 64,
                  "max_seq_len": 256},
    "125M": {"dim": 768, "n_layers": 12, "n_heads": 12, "ffn_multiple_of": 256, "max_seq_len": 2048},
    "350M": {"dim": 1024, "n_layers": 24, "n_heads": 16, "ffn_multiple_of": 256, "max_seq_len": 2048},
    "1.3B": {"dim": 2048, "n_layers": 24, "n_heads": 16, "ffn_multiple_of": 256, "max_seq_len": 2048},
    "7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "ffn_multiple_of": 256, "max_seq_len": 4096},
    "13B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "ffn_multiple_of": 256, "max_seq_len": 4096},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim": 28672,
            "ffn_multiple_of": 4096, "max_seq_len": 4096},
}


# Defaults of each scaling type's own keys: a key of another type (or any key under type none)
# set away from its default is refused rather than silently ignored.
_ROPE_SCALING_KEYS: dict[str, dict[str, Any]] = {
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn": {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
             "attention_factor": None, "truncate": True},
}


class RopeScalingConfig(Section):
    """Rotary embedding frequency scaling for a longer context (section ``model.rope_scaling``).

    The keys and formulas are Hugging Face's (``rope_parameters`` in a Llama ``config.json``),
    so a scaled model exports to and imports from ``LlamaForCausalLM`` exactly (see
    :mod:`model.rope`).
    """

    type: Literal["none", "llama3", "yarn"] = "none"
    """none: plain rotary embeddings; llama3: Llama 3.1's per-frequency scaling (low frequencies divided by factor, high ones kept, a smooth ramp between); yarn: YaRN (NTK-by-parts interpolation plus an attention temperature that scales cos/sin)."""
    factor: float | None = None
    """How many times longer the new context is than original_max_position_embeddings (>= 1; required for llama3 and yarn); usually model.max_seq_len / original_max_position_embeddings."""
    original_max_position_embeddings: int | None = None
    """The context the model was pretrained with before the extension (required for llama3 and yarn)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept; must exceed low_freq_factor."""
    beta_fast: float = 32.0
    """yarn: rotations over the original context above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """yarn: rotations over the original context below which a frequency is divided by factor (interpolated)."""
    mscale: float | None = None
    """yarn: with mscale_all_dim, the attention factor is (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * ln(factor) + 1) (DeepSeek style); null: 0.1 * ln(factor) + 1."""
    mscale_all_dim: float | None = None
    """yarn: see mscale."""
    attention_factor: float | None = None
    """yarn: the factor that multiplies cos and sin (attention temperature); null derives it from factor (and mscale)."""
    truncate: bool = True
    """yarn: round the interpolation ramp's ends to whole dimensions (Hugging Face's default; false for gpt-oss style)."""

    @model_validator(mode="after")
    def _check(self) -> RopeScalingConfig:
        foreign = {k: v for kind, keys in _ROPE_SCALING_KEYS.items() if kind != self.type
                   for k, v in keys.items() if getattr(self, k) != v}
        if self.type == "none":
            foreign.update({k: getattr(self, k) for k in ("factor", "original_max_position_embeddings")
                            if getattr(self, k) is not None})
        if foreign:
            names = ", ".join(f"model.rope_scaling.{k}" for k in sorted(foreign))
            raise ValueError(f"model.rope_scaling.type={self.type} does not use {names}; remove "
                             "them or choose the scaling type they belong to (llama3 or yarn)")
        if self.type == "none":
            return self
        if self.original_max_position_embeddings is None or self.original_max_position_embeddings <= 0:
            raise ValueError(f"model.rope_scaling.type={self.type} needs model.rope_scaling."
                             "original_max_position_embeddings: the positive context length the "
                             "model was pretrained with")
        if self.factor is None:
            raise ValueError(f"model.rope_scaling.type={self.type} needs model.rope_scaling.factor "
                             "(new context / original_max_position_embeddings, e.g. 4)")
        if self.factor < 1:
            raise ValueError(f"model.rope_scaling.factor must be at least 1, got {self.factor}")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.type == "yarn" and not 0 < self.beta_slow <= self.beta_fast:
            raise ValueError(f"model.rope_scaling needs 0 < beta_slow <= beta_fast, got "
                             f"{self.beta_slow} and {self.beta_fast}")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(f"model.rope_scaling.attention_factor must be positive, got "
                             f"{self.attention_factor}")
        return self


class ModelConfig(Section):
    """Decoder-only Llama-style Transformer shape (section ``model``)."""

    preset: str | None = None
    """Named size preset (tiny, cpu-small, 125M, 350M, 1.3B, 7B, 13B, 70B); explicit keys set here override it."""
    vocab_size: int = 32000
    """Vocabulary size; replaced by the tokenizer's vocabulary size by the stages that have one."""
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
    rope_scaling: RopeScalingConfig = Field(default_factory=RopeScalingConfig)
    """Rotary frequency scaling (llama3 or yarn, Hugging Face's formulas) for a context longer than pretraining."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weight matrices."""
    init_depth_scaled: bool = True
    """Scale the residual output projections' init by 1/sqrt(2 * n_layers)."""
    attention: Literal["causal", "document"] = "causal"
    """causal: each token attends to every earlier token of its packed sample; document: only to the earlier tokens of its own document, documents being separated by eos_id (the EOS token belongs to the document it ends), so each document scores as if it were alone in the sample. With document, rotary positions restart at 0 at each document's first token; rotary attention depends only on the distance between query and key, so this changes no score in exact arithmetic, but it makes a packed document's rotary tables those of the document alone (no large positions rounded in fp32). Document attention runs FlexAttention with a block mask on CUDA (no T x T tensor; empty tiles skipped) and a dense (B, 1, T, T) additive mask in the activations' dtype elsewhere, shared by all layers (see model/attention.py). Incremental decoding and Hugging Face export are causal: exact for inputs holding one document."""
    eos_id: int | None = None
    """The end-of-document token id that separates documents in packed samples (attention=document); null: pretraining takes the token shards' tokenizer's EOS id (an explicit value must equal it)."""
    activation_checkpointing: bool | int = False
    """Recompute blocks' activations in the backward pass to save memory: false or 0 (none), true or 1 (every block), or an integer k >= 2: blocks 0, k, 2k, ... (block index divisible by k; ceil(n_layers / k) of them) are recomputed, the others keep their activations. Each recomputed block costs one more forward of it; ``launcher/pretrain.py --dry-run`` prints the activation memory of the choice."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype when the model is built outside DeepSpeed (generation, export)."""

    @model_validator(mode="wrap")
    @classmethod
    def _apply_preset(cls, data: Any, handler: ModelWrapValidatorHandler[ModelConfig]) -> ModelConfig:
        """Fill in the preset's keys under the ones given. Only the given keys count as set
        (``model_fields_set``), so a stage can tell a value the recipe or command line chose
        from a preset's or a default (see :func:`resolve_model_config`'s ``seq_len``)."""
        if not isinstance(data, dict) or data.get("preset") is None:
            return handler(data)
        name = data["preset"]
        if name not in PRESETS:
            raise ValueError(
                f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)} "
                "or set the shape keys (dim, n_layers, ...) yourself"
            )
        validated = handler({**PRESETS[name], **data})
        # pydantic's record of the given fields (what model_fields_set returns)
        object.__setattr__(validated, "__pydantic_fields_set__", set(data) & set(cls.model_fields))
        return validated

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        kv = self.n_kv_heads or self.n_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({kv})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"model.dim / model.n_heads = {self.dim // self.n_heads} must be even for rotary "
                "embeddings; change model.dim or model.n_heads"
            )
        if self.checkpoint_every < 0:
            raise ValueError(
                f"model.activation_checkpointing must be false, true or a block interval k >= 1, "
                f"got {self.activation_checkpointing}"
            )
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"model.ffn_dim must be positive or null, got {self.ffn_dim}")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"model.eos_id must be a token id in [0, vocab_size={self.vocab_size}), got "
                             f"{self.eos_id}; leave it null to take the tokenizer's EOS id")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("model.norm_eps and model.init_std must be positive")
        return self

    # Derived shapes (not config keys).
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def checkpoint_every(self) -> int:
        """``activation_checkpointing`` as a block interval: 0 none, 1 every block, k every k-th."""
        return int(self.activation_checkpointing)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU hidden size: ``ffn_dim`` or 8/3 * dim rounded up to ``ffn_multiple_of``."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)


def max_seq_len_is_explicit(cfg: ModelConfig) -> bool:
    """Whether ``max_seq_len`` was given (recipe, command line, saved config) rather than taken
    from the preset or the default."""
    return "max_seq_len" in cfg.model_fields_set


def resolve_model_config(cfg: ModelConfig, vocab_size: int | None = None, seq_len: int | None = None) -> ModelConfig:
    """A concrete config: the named preset under the explicitly set keys, and the tokenizer's
    vocabulary size (when given) in place of ``vocab_size``. ``preset`` is kept for the record.

    ``seq_len`` is the sequence length of the training data (the token shards' ``seq_len``):
    when ``max_seq_len`` was not set explicitly and the preset's (or default) context is
    shorter, the context grows to ``seq_len``; an explicit ``max_seq_len`` is kept as given
    (the caller refuses one that is too short). The result has every key set, so it is saved
    and compared (checkpoint resume) as the value the model was built with.

    Idempotent: resolving a resolved config (or one read back from a saved ``config.yaml``)
    changes nothing but ``vocab_size``.
    """
    values: dict[str, Any] = {}
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[cfg.preset])
    values.update({k: getattr(cfg, k) for k in cfg.model_fields_set})
    if seq_len is not None and not max_seq_len_is_explicit(cfg):
        values["max_seq_len"] = max(values.get("max_seq_len", cfg.max_seq_len), seq_len)
    if vocab_size is not None:
        if vocab_size <= 0:
            raise ConfigError(f"the tokenizer's vocabulary size must be positive, got {vocab_size}")
        values["vocab_size"] = vocab_size
    values["preset"] = cfg.preset
    full = {**{k: getattr(cfg, k) for k in type(cfg).model_fields}, **values}
    return ModelConfig.model_validate(full)
