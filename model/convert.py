"""Hugging Face ``LlamaForCausalLM`` directories from model directories, and back.

Export streams tensors from the model directory's safetensors into size-bounded shards, so
exporting a model larger than host memory holds at most one shard (plus one tensor) at a time.
The names and config are mapped by :mod:`model.hf_mapping`; import reads the Hugging Face
directory with :func:`model.io.read_hf_dir` and writes a model directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from crucible.errors import DataError
from crucible.fileio import atomic_path, atomic_write_json
from model.config import ModelConfig
from model.hf_mapping import layer_index, to_hf_config, to_hf_key
from model.io import (
    EXPORTED_CONFIG_FILE,
    HF_CONFIG_FILE,
    HF_INDEX_FILE,
    HF_WEIGHTS_FILE,
    TOKENIZER_FILES,
    read_hf_dir,
    read_model_config,
    save_model_dir,
    weight_files,
)

log = logging.getLogger(__name__)


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


def _iter_tensors(where: dict[str, Path], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for name in names:
        with safe_open(str(where[name]), framework="pt") as f:
            yield name, f.get_tensor(name)


def export_weights(weights: Path | list[Path], out: Path, cfg: ModelConfig,
                   max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> list[str]:
    """Write our safetensors ``weights`` (one file, or a model directory's shards) as Hugging
    Face named safetensors in ``out``, one shard at a time (``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` plus the index when larger than ``max_shard_bytes``).
    Returns the files written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sizes: dict[str, int] = {}
    where: dict[str, Path] = {}
    for file in [weights] if isinstance(weights, Path) else weights:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                itemsize = dtype.itemsize if dtype is not None else _ST_ITEMSIZE[sl.get_dtype()]
                sizes[name] = n * itemsize
                where[name] = file
    if cfg.tie_embeddings:
        sizes.pop("lm_head.weight", None)
    order = sorted(sizes, key=_export_order)
    shards = _plan_shards([(n, sizes[n]) for n in order], max_shard_bytes)
    files = ([HF_WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    for file, names in zip(files, shards):
        tensors = {}
        for name, tensor in _iter_tensors(where, names):
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
    """Embedding first, then the layers in order, then the final norm and output head."""
    layer = layer_index(name)
    if layer is not None:
        return (1, layer, name)
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
    model_dir, out = Path(model_dir), Path(out_dir)
    cfg = read_model_config(model_dir)
    weights = weight_files(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        cfg = cfg.model_copy(update={"dtype": dtype})
    torch_dtype = getattr(torch, dtype) if dtype is not None else None
    export_weights(weights, out, cfg, max_shard_bytes, torch_dtype)
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()
    bos, eos, pad = _special_ids(model_dir)
    atomic_write_json(out / HF_CONFIG_FILE, to_hf_config(cfg, bos, eos, pad), indent=2, sort_keys=False)
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

    hf_dir = Path(hf_dir)
    if not (hf_dir / HF_CONFIG_FILE).is_file():
        raise DataError(f"{hf_dir} is not a Hugging Face model directory (no {HF_CONFIG_FILE})")
    cfg, state = read_hf_dir(hf_dir)
    has_tokenizer = any((hf_dir / name).is_file() for name in TOKENIZER_FILES)
    if not has_tokenizer:
        log.warning("%s has no tokenizer files; the model directory will have none", hf_dir)
    prov = {**provenance(cfg), "imported_from": str(hf_dir.resolve())}
    return save_model_dir(out_dir, state, cfg, tokenizer_dir=hf_dir if has_tokenizer else None,
                          provenance=prov)
