"""Rotary position embedding tables, with the frequency scalings that extend a model's context.

Each scaling type of ``model.rope_scaling`` maps to one function that turns the config into the
rotary inverse frequencies (head_dim/2, fp32) and an attention factor that multiplies cos and
sin (YaRN's temperature; 1 otherwise). The formulas, their operation order and their dtypes are
those of Hugging Face's ``transformers.modeling_rope_utils`` (``rope_type`` default, ``llama3``
and ``yarn``), so a scaled model exported as ``LlamaForCausalLM`` with the same
``rope_parameters`` computes the same cos/sin tables bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from model.config import ModelConfig


class RopeFrequencies(NamedTuple):
    inv_freq: torch.Tensor
    """(head_dim/2,) fp32 inverse frequencies."""
    attention_factor: float
    """Multiplies cos and sin (YaRN's attention temperature; 1.0 for the other types)."""


def default_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies ``1 / theta^(2i/head_dim)`` (fp32), computed as Hugging Face does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def _plain(cfg: ModelConfig, device: torch.device | None) -> RopeFrequencies:
    return RopeFrequencies(default_inv_freq(cfg.head_dim, cfg.rope_theta, device), 1.0)


def _llama3(cfg: ModelConfig, device: torch.device | None) -> RopeFrequencies:
    """Llama 3.1: wavelengths longer than ``original / low_freq_factor`` are stretched by
    ``factor``, those shorter than ``original / high_freq_factor`` are kept, and the ones in
    between are blended by where ``original / wavelength`` falls between the two factors."""
    s = cfg.rope_scaling
    inv_freq = default_inv_freq(cfg.head_dim, cfg.rope_theta, device)
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    blended = (1 - smooth) * stretched / s.factor + smooth * stretched
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return RopeFrequencies(torch.where(medium, blended, stretched), 1.0)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(cfg: ModelConfig, device: torch.device | None) -> RopeFrequencies:
    """YaRN (arXiv 2309.00071): frequencies that turn fewer than ``beta_slow`` times over the
    original context are interpolated (divided by ``factor``), those that turn more than
    ``beta_fast`` times are kept, with a linear ramp over the dimensions in between; cos/sin
    are multiplied by an attention factor (``0.1 ln(factor) + 1`` unless given)."""
    s = cfg.rope_scaling
    dim, base = cfg.head_dim, cfg.rope_theta
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        """The dimension whose frequency turns ``rotations`` times over the original context."""
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = (1 - ramp).to(device=device)  # 1: extrapolate (keep), 0: interpolate (divide by factor)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    return RopeFrequencies(interpolated * (1 - keep) + extrapolated * keep, float(attention_factor))


ROPE_SCALINGS: dict[str, Callable[[ModelConfig, torch.device | None], RopeFrequencies]] = {
    "none": _plain,
    "llama3": _llama3,
    "yarn": _yarn,
}
"""``model.rope_scaling.type`` -> the function computing its frequencies."""


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> RopeFrequencies:
    """The inverse frequencies and attention factor of ``cfg``'s rotary embedding and scaling."""
    return ROPE_SCALINGS[cfg.rope_scaling.type](cfg, device)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``positions.shape + (head_dim,)``, halves repeated and scaled by
    ``attention_factor`` in fp32 before the cast (as Hugging Face's ``LlamaRotaryEmbedding``)."""
    freqs = positions[..., None].float() * inv_freq  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (``positions.shape + (head_dim,)``, ``dtype``) for ``cfg``'s rotary
    embedding at integer ``positions``, scaled as ``cfg.rope_scaling`` says."""
    inv_freq, attention_factor = rope_frequencies(cfg, positions.device)
    return rope_cos_sin(inv_freq, positions, dtype, attention_factor)
