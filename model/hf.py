"""Exact conversion to and from Hugging Face ``LlamaForCausalLM`` directories.

Our rotary layout is Hugging Face's (pairs ``(i, i + head_dim/2)``), so conversion is a pure
renaming of tensors: no projection row is permuted, no value changes, and a round trip
ours -> Hugging Face -> ours is bit-identical. Export streams tensors from the model
directory's safetensors into size-bounded shards, so exporting a model larger than host
memory holds at most one shard (plus one tensor) at a time.

Reading a Hugging Face directory needs only its ``config.json`` and safetensors weights
(``model.safetensors`` or a sharded index); pickled ``pytorch_model.bin`` files are refused.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crucible.errors import DataError
from crucible.fileio import atomic_path, atomic_write_json
from model.config import ModelConfig

log = logging.getLogger(__name__)

HF_INDEX_FILE = "model.safetensors.index.json"
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
    (read by transformers 4 and most other Llama loaders).
    """
    return {
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
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
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


def _unsupported(key: str, value: Any, why: str) -> DataError:
    return DataError(f"Hugging Face config {key}={value!r} is not supported: {why}")


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Hugging Face Llama ``config.json``; refuses what our model cannot
    represent exactly (biases, rope scaling, other activations, an odd head_dim)."""
    if hf.get("model_type") != "llama":
        raise _unsupported("model_type", hf.get("model_type"), "only Llama models can be imported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _unsupported(flag, hf[flag], "our model has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "our MLP is SwiGLU (silu)")
    if (hf.get("pretraining_tp") or 1) != 1:
        log.info("ignoring pretraining_tp=%s (it only changes how HF splits matmuls)", hf["pretraining_tp"])
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise _unsupported("rope_type", rope_type, "only plain rotary embeddings are implemented")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise _unsupported("head_dim", head_dim, f"our model needs head_dim = hidden_size / "
                           f"num_attention_heads = {hf['hidden_size'] // heads}")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
    )


# ---------------------------------------------------------------- import

EXPORTED_CONFIG_FILE = "crucible_model_config.json"


def _shape(cfg: ModelConfig) -> tuple:
    return (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim,
            cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings)


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / HF_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise DataError(
            f"{path} holds only pickled PyTorch weights, which are never loaded (they can run "
            "code); convert them to safetensors first (e.g. save_pretrained(..., "
            "safe_serialization=True) in a trusted environment)"
        )
    raise DataError(f"{path} has config.json but no model.safetensors or {HF_INDEX_FILE}")


def read_hf_dir(path: str | Path, device: torch.device | str = "cpu"
                ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and state dict (our tensor names) from a Hugging Face Llama directory."""
    from safetensors import safe_open

    path = Path(path)
    try:
        hf_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path / 'config.json'}: {exc}") from None
    cfg = from_hf_config(hf_cfg)
    ours = path / EXPORTED_CONFIG_FILE
    if ours.is_file():  # exported by us: keep the preset and init settings of the record
        recorded = ModelConfig.model_validate_json(ours.read_text(encoding="utf-8"))
        if _shape(recorded) == _shape(cfg):
            cfg = recorded
        else:
            log.warning("%s disagrees with config.json (edited?); using config.json", ours)
    hf_state: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
                hf_state[key] = f.get_tensor(key)
    state = from_hf_state_dict(hf_state, cfg)
    del hf_state
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state and "embed.weight" in state:
        raise DataError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
    return cfg, state


# ---------------------------------------------------------------- export

def _plan_shards(tensors: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in tensors:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _iter_tensors(weights: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for name in names:
            yield name, f.get_tensor(name)


def export_weights(weights: Path, out: Path, cfg: ModelConfig,
                   max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> list[str]:
    """Write our safetensors ``weights`` as Hugging Face named safetensors in ``out``, one
    shard at a time (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the
    index when larger than ``max_shard_bytes``). Returns the files written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), framework="pt") as f:
        sizes = {}
        for name in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
            sl = f.get_slice(name)
            n = 1
            for d in sl.get_shape():
                n *= d
            itemsize = dtype.itemsize if dtype is not None else _ST_ITEMSIZE[sl.get_dtype()]
            sizes[name] = n * itemsize
    if cfg.tie_embeddings:
        sizes.pop("lm_head.weight", None)
    order = sorted(sizes, key=_export_order)
    shards = _plan_shards([(n, sizes[n]) for n in order], max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    for file, names in zip(files, shards):
        tensors = {}
        for name, tensor in _iter_tensors(weights, names):
            tensors[to_hf_key(name)] = tensor.to(dtype) if dtype is not None else tensor
            weight_map[to_hf_key(name)] = file
        with atomic_path(out / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        atomic_write_json(out / HF_INDEX_FILE, index, indent=2, sort_keys=True)
    return files


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _export_order(name: str) -> tuple[int, int, str]:
    m = _OUR_LAYER.match(name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name == "embed.weight" else 2, 0, name)


def _special_ids(model_dir: Path) -> tuple[int | None, int | None, int | None]:
    """bos/eos/pad ids from the model directory's tokenizer (Llama layout + pad by default)."""
    sp_model = model_dir / "tokenizer.model"
    if sp_model.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        ids = (sp.bos_id(), sp.eos_id(), sp.pad_id())
        return tuple(i if i >= 0 else None for i in ids)  # type: ignore[return-value]
    return 1, 2, 3


def _copy_file(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_hf_tokenizer(model_dir: Path, out: Path) -> None:
    """Hugging Face tokenizer files in ``out``: copied when the model directory has them
    (``tokenizer.json``), else converted from its sentencepiece ``tokenizer.model``."""
    if (model_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.model", "added_tokens.json"):
            if (model_dir / name).is_file():
                _copy_file(model_dir / name, out / name)
        return
    if not (model_dir / "tokenizer.model").is_file():
        raise DataError(
            f"{model_dir} has no tokenizer files (tokenizer.json or tokenizer.model); a model "
            "directory written with tokenizer_dir=... carries them"
        )
    import sentencepiece as spm
    from transformers import TokenizersBackend

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    specials = {name: sp.id_to_piece(i) for name, i in
                (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                 ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())) if i >= 0}
    # Converted from the sentencepiece model's own settings (its normaliser, whitespace
    # handling, byte fallback), so it encodes exactly as SentencePieceProcessor.encode.
    tok = TokenizersBackend.from_pretrained(str(model_dir), **specials)
    tok.save_pretrained(str(out))
    # transformers 5 maps this name to its tokenizers backend; transformers 4 knows only this one
    config_file = out / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(config_file, tok_config, indent=2, sort_keys=False)
    _copy_file(model_dir / "tokenizer.model", out / "tokenizer.model")


def export_hf(model_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
              dtype: str | None = None) -> Path:
    """Write a Hugging Face Llama directory (config, generation config, safetensors weights,
    tokenizer files) for the model directory ``model_dir``."""
    from model.io import WEIGHTS_FILE, read_model_config

    model_dir, out = Path(model_dir), Path(out_dir)
    cfg = read_model_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{model_dir} has no {WEIGHTS_FILE}")
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        cfg = cfg.model_copy(update={"dtype": dtype})
    torch_dtype = getattr(torch, dtype) if dtype is not None else None
    export_weights(weights, out, cfg, max_shard_bytes, torch_dtype)
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()
    bos, eos, pad = _special_ids(model_dir)
    atomic_write_json(out / "config.json", to_hf_config(cfg, bos, eos, pad), indent=2, sort_keys=False)
    atomic_write_json(out / EXPORTED_CONFIG_FILE, cfg.model_dump(mode="json"), indent=2, sort_keys=False)
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    atomic_write_json(out / "generation_config.json", gen, indent=2, sort_keys=False)
    if has_tokenizer:
        write_hf_tokenizer(model_dir, out)
    else:
        log.warning("%s has no tokenizer files; the export holds weights and config only", model_dir)
    return out


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face Llama directory into a model directory (our names, exact
    weights, its tokenizer files, provenance naming the source)."""
    from crucible.provenance import provenance
    from model.io import TOKENIZER_FILES, save_model_dir

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise DataError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    cfg, state = read_hf_dir(hf_dir)
    has_tokenizer = any((hf_dir / name).is_file() for name in TOKENIZER_FILES)
    if not has_tokenizer:
        log.warning("%s has no tokenizer files; the model directory will have none", hf_dir)
    prov = {**provenance(cfg), "imported_from": str(hf_dir.resolve())}
    return save_model_dir(out_dir, state, cfg, tokenizer_dir=hf_dir if has_tokenizer else None,
                          provenance=prov)
