"""Our tensor names and model config <-> Hugging Face ``LlamaForCausalLM``'s (names only: no files).

Our rotary layout is Hugging Face's (pairs ``(i, i + head_dim/2)``), so conversion is a pure
renaming of tensors: no projection row is permuted, no value changes, and a round trip
ours -> Hugging Face -> ours is bit-identical. Reading and writing Hugging Face directories
builds on this: :func:`model.io.read_hf_dir` and :mod:`model.convert`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from crucible.errors import DataError
from model.config import ModelConfig, RopeScalingConfig

log = logging.getLogger(__name__)

# Our tensor name -> Hugging Face name, per layer and for the whole model.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_OUR_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_OUR_TOP = {v: k for k, v in _TOP_NAMES.items()}


def layer_index(key: str) -> int | None:
    """The layer number in our tensor name ``layers.<i>.<...>``; None for a whole-model tensor."""
    m = _OUR_LAYER.match(key)
    return int(m.group(1)) if m else None


def to_hf_key(key: str) -> str:
    """Hugging Face ``LlamaForCausalLM`` name of our tensor ``key``."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    m = _OUR_LAYER.match(key)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for tensor {key!r}")


def from_hf_key(key: str) -> str | None:
    """Our name of the Hugging Face tensor ``key``; None for the rotary ``inv_freq`` buffers
    that some old checkpoints carry (recomputed, not stored)."""
    if key in _HF_TO_OUR_TOP:
        return _HF_TO_OUR_TOP[key]
    m = _HF_LAYER.match(key)
    if m and m.group(2) in _HF_TO_OUR_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_OUR_LAYER[m.group(2)]}"
    if key.endswith("rotary_emb.inv_freq"):
        return None
    raise DataError(f"unknown tensor {key!r} in the Hugging Face checkpoint (not a plain Llama model?)")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under Hugging Face names (same tensors; a tied head left out)."""
    return {to_hf_key(k): v for k, v in state_dict.items()
            if not (cfg.tie_embeddings and k == "lm_head.weight")}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face tensors (same tensors, our names)."""
    state = {}
    for key, tensor in hf_state.items():
        ours = from_hf_key(key)
        if ours is not None:
            state[ours] = tensor
    return state


# ---------------------------------------------------------------- configs

def to_hf_config(cfg: ModelConfig, bos_id: int | None = 1, eos_id: int | None = 2,
                 pad_id: int | None = 3) -> dict[str, Any]:
    """``config.json`` contents of the equivalent ``LlamaForCausalLM``.

    The rotary base is written both as ``rope_parameters`` (transformers 5) and ``rope_theta``
    (read by transformers 4 and most other Llama loaders); a scaled rotary embedding's
    parameters are in ``rope_parameters`` and, without the base, in the legacy ``rope_scaling``.
    """
    scaling = hf_rope_scaling(cfg.rope_scaling)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})},
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": cfg.dtype,
    }
    if scaling is not None:
        hf["rope_scaling"] = scaling
    return hf


# Hugging Face's keys of each scaling type (the same names as model.rope_scaling's), besides
# rope_type, rope_theta, factor and original_max_position_embeddings.
_HF_SCALING_KEYS = {
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"),
}


def hf_rope_scaling(scaling: RopeScalingConfig) -> dict[str, Any] | None:
    """Hugging Face's ``rope_scaling`` for ours (``rope_parameters`` less ``rope_theta``);
    None for plain rotary embeddings. Keys left null (YaRN's derived ones) are left out."""
    if scaling.type == "none":
        return None
    out = {"rope_type": scaling.type, "factor": scaling.factor,
           "original_max_position_embeddings": scaling.original_max_position_embeddings}
    for key in _HF_SCALING_KEYS[scaling.type]:
        if getattr(scaling, key) is not None:
            out[key] = getattr(scaling, key)
    return out


def _rope_scaling_from_hf(rope_type: str, params: dict[str, Any], max_positions: int) -> RopeScalingConfig:
    """Our ``rope_scaling`` for Hugging Face's parameters, with the defaults transformers uses
    for absent keys (``original_max_position_embeddings``: ``max_position_embeddings``; YaRN's
    ``factor``: their ratio; null betas: 32 and 1)."""
    if rope_type not in _HF_SCALING_KEYS:
        raise _unsupported("rope_type", rope_type, "only default, llama3 and yarn rotary "
                           "embeddings are implemented (model.rope_scaling.type)")
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor")
    if factor is None and rope_type == "yarn":
        factor = max_positions / original
    if factor is None:
        raise _unsupported("rope_parameters", params, "llama3 scaling needs a factor")
    values: dict[str, Any] = {"type": rope_type, "factor": factor,
                              "original_max_position_embeddings": original}
    for key in _HF_SCALING_KEYS[rope_type]:
        if params.get(key) is not None:
            values[key] = params[key]
    if rope_type == "yarn":  # transformers reads these with `or`: 0 and null mean the default
        values["beta_fast"] = params.get("beta_fast") or 32.0
        values["beta_slow"] = params.get("beta_slow") or 1.0
    try:
        return RopeScalingConfig(**values)
    except ValueError as exc:
        raise _unsupported("rope_parameters", params, str(exc)) from None


def _unsupported(key: str, value: Any, why: str) -> DataError:
    return DataError(f"Hugging Face config {key}={value!r} is not supported: {why}")


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Hugging Face Llama ``config.json``; refuses what our model cannot
    represent exactly (biases, rope scalings other than llama3 and yarn, other activations, an
    odd head_dim)."""
    if hf.get("model_type") != "llama":
        raise _unsupported("model_type", hf.get("model_type"), "only Llama models can be imported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _unsupported(flag, hf[flag], "our model has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "our MLP is SwiGLU (silu)")
    if (hf.get("pretraining_tp") or 1) != 1:
        log.info("ignoring pretraining_tp=%s (it only changes how HF splits matmuls)", hf["pretraining_tp"])
    # transformers 5 reads the legacy rope_scaling in preference to rope_parameters
    legacy = hf.get("rope_scaling") or {}
    rope = {**(hf.get("rope_parameters") or {}), **legacy}
    rope_type = legacy.get("rope_type") or legacy.get("type") or rope.get("rope_type") or "default"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_positions = hf.get("max_position_embeddings", 2048)
    scaling = (RopeScalingConfig() if rope_type == "default"
               else _rope_scaling_from_hf(rope_type, rope, max_positions))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise _unsupported("head_dim", head_dim, f"our model needs head_dim = hidden_size / "
                           f"num_attention_heads = {hf['hidden_size'] // heads}")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"], max_seq_len=max_positions,
        rope_theta=float(theta), rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
    )
