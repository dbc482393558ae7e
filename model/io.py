"""The model directory: the one on-disk form every tool reads.

::

    model.safetensors      weights, this package's tensor names (a tied output head is stored once);
                           above the shard size ``model-0000K-of-0000N.safetensors`` shards plus
                           ``model.safetensors.index.json`` (Hugging Face's names and index)
    model_config.json      the resolved ModelConfig
    tokenizer.model ...    the tokenizer files (sentencepiece + Hugging Face), copied in
    provenance.json        where the weights came from (code, library versions, config)

:func:`load_model_dir` also reads a Hugging Face Llama directory (``config.json`` +
safetensors, see :func:`read_hf_dir`), for continued pretraining from public weights; writing
one, and importing one into a model directory, is :mod:`model.convert`. Nothing here unpickles:
pickled ``pytorch_model.bin`` files are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from crucible.errors import DataError
from crucible.fileio import atomic_path, atomic_write_json
from crucible.run_layout import (
    CHECKPOINTS,
    LATEST,
    MARKER,
    MODEL_DIR,
    MODEL_FILES,
    file_inventory,
    inventory_problem,
    marked_checkpoints,
    read_record,
    resolve_record,
)
from model.config import ModelConfig
from model.hf_mapping import from_hf_config, from_hf_state_dict
from model.transformer import Transformer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
PROVENANCE_FILE = "provenance.json"
# Files of a tokenizer folder that travel with the weights (those present are copied).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)
TIED_KEY = "lm_head.weight"
# A Hugging Face Llama directory: its config, the index of sharded weights, and the record of our
# own config that an export by this package adds (read back on import).
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
EXPORTED_CONFIG_FILE = "crucible_model_config.json"
# Weights above this many bytes are written as several shards (Hugging Face's naming).
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
# A fine-tuned task model directory (model/task_io.py) adds these to a model directory.
TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"
INDEX_FILE = HF_INDEX_FILE
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def expected_keys(cfg: ModelConfig) -> list[str]:
    """Tensor names of a saved model directory for ``cfg`` (tied head not stored)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    keys = list(model.state_dict().keys())
    return [k for k in keys if not (cfg.tie_embeddings and k == TIED_KEY)]


def _items(weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(weights.items()) if isinstance(weights, Mapping) else iter(weights)


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """The safetensors format written straight from the tensors' memory (``save_file`` makes a
    bytes copy of every tensor first, doubling a shard's memory)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names. A DataError names what is missing."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"cannot read the shard index {index}: {exc}") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise DataError(f"{model_dir / missing[0]} is missing (named by {index})")
        return [model_dir / n for n in names]
    if (model_dir / WEIGHTS_FILE).is_file():
        return [model_dir / WEIGHTS_FILE]
    raise DataError(f"{model_dir} has no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_weights(model_dir: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's weights (one file or shards)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        state.update(load_file(str(file), device=str(device)))
    return state


def write_weights(out: str | Path, weights: Weights, cfg: ModelConfig,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write the weights of a model directory from a mapping or an iterator of ``(name, tensor)``,
    one shard at a time: ``model.safetensors`` when they fit in ``max_shard_bytes``, else
    ``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``. Holds at most one
    shard plus the next tensor. Names must be this package's (a tied head is dropped); returns
    the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    want = set(expected_keys(cfg))
    seen: set[str] = set()
    pending: list[tuple[str, torch.Tensor]] = []
    pending_bytes = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        part = out / f"model-{len(written) + 1:05d}.safetensors.part"
        _write_safetensors(part, pending)
        written.append((part, [n for n, _ in pending]))
        pending, pending_bytes = [], 0

    try:
        for name, tensor in _items(weights):
            if cfg.tie_embeddings and name == TIED_KEY:
                continue
            if name not in want or name in seen:
                raise ValueError(f"state dict does not match the model config: unexpected {name!r} (keys "
                                 "must be this package's parameter names, without a 'module.' prefix)")
            seen.add(name)
            tensor = tensor.detach().to("cpu").contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if pending and pending_bytes + nbytes > max_shard_bytes:
                flush()
            pending.append((name, tensor))
            pending_bytes += nbytes
            total += nbytes
        missing = sorted(want - seen)
        if missing:
            raise ValueError(f"state dict does not match the model config: missing {missing[:5]} (keys "
                             "must be this package's parameter names, without a 'module.' prefix)")
        if pending or not written:
            flush()
    except BaseException:
        for part, _ in written:
            part.unlink(missing_ok=True)
        raise
    for stale in [out / WEIGHTS_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(written) == 1:
        os.replace(written[0][0], out / WEIGHTS_FILE)
        return [WEIGHTS_FILE]
    files = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for (part, names), file in zip(written, files):
        os.replace(part, out / file)
        weight_map.update({n: file for n in names})
    atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map},
                      indent=2, sort_keys=True)
    return files


def save_model_dir(
    path: str | Path,
    state_dict: Weights | None,
    cfg: ModelConfig,
    tokenizer_dir: str | Path | None = None,
    provenance: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a model directory: safetensors weights (see :func:`write_weights`; ``state_dict``
    a mapping or an iterator of ``(name, tensor)``, or None for every file but the weights),
    ``model_config.json``, the tokenizer files found in ``tokenizer_dir`` and ``provenance.json``
    (``provenance`` or one made now).

    Every file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        write_weights(out, state_dict, cfg, max_shard_bytes)
    atomic_write_json(out / CONFIG_FILE, cfg.model_dump(mode="json"), indent=2, sort_keys=False)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    if provenance is None:
        from crucible.provenance import provenance as make_provenance

        provenance = make_provenance(cfg)
    atomic_write_json(out / PROVENANCE_FILE, provenance, indent=2, sort_keys=True)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` into ``dst``; returns the names copied."""
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
        raise DataError(
            f"{src} holds no tokenizer (expected tokenizer.model or tokenizer.json); "
            "pass the tokenizer folder written by launcher/build_tokenizer.py"
        )
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
            copied.append(name)
    return copied


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_model_config(path: str | Path) -> ModelConfig:
    file = Path(path) / CONFIG_FILE
    try:
        return ModelConfig.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the model config {file}: {exc}") from None


def model_from_state_dict(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                          device: torch.device | str = "cpu") -> Transformer:
    """A model holding exactly ``state_dict`` (built on meta: no random init, no double memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = dict(state_dict)
    if cfg.tie_embeddings:
        sd.pop(TIED_KEY, None)
        if "embed.weight" in sd:
            sd[TIED_KEY] = sd["embed.weight"]
    sd = {k: v.to(device) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise DataError(f"weights do not match the model config: {exc}") from None
    model.tie_weights()
    return model


def find_model_dir(path: str | Path) -> Path:
    """The model directory meant by ``path``: a model directory or a Hugging Face directory
    itself, a checkpoint directory holding ``model/``, or a run directory, whose newest complete
    checkpoint with a whole model directory is used (a damaged one is skipped with a warning
    naming the file).

    A run directory resolves inside itself only, so that a moved, copied or synced one still
    means itself: ``latest.json`` is a pointer relative to it, and an absolute path in one
    written by an older version, if it lies elsewhere (the directory was moved since), is ignored
    with a warning instead of followed to whatever sits at the old place now.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} does not exist or is not a directory (pass a model directory, "
                        "a Hugging Face Llama directory or a run directory)")
    if is_model_dir(path) or (path / HF_CONFIG_FILE).is_file():
        return path
    if _unconsolidated(path):
        return _consolidated(path)
    if is_model_dir(path / MODEL_DIR):
        return _checkpoint_model_dir(path)
    if (path / LATEST).is_file() or (path / CHECKPOINTS).is_dir() or (path / "deepspeed_config.json").is_file():
        return _run_model_dir(path)
    return path


def _checkpoint_model_problem(ckpt_dir: Path) -> str | None:
    """Why the model directory of a checkpoint is not whole (one line naming the file), or None.
    A consolidated one has its own marker listing its files with their sizes; one saved by an
    older version is listed in the checkpoint's marker; its config parses."""
    model_dir = ckpt_dir / MODEL_DIR
    marker, problem = read_record(ckpt_dir / MARKER)
    if marker is None:
        return problem
    if (model_dir / MARKER).is_file():
        model_marker, problem = read_record(model_dir / MARKER)
        if model_marker is not None:
            problem = inventory_problem(model_dir, model_marker.get("files") or {})
        return problem or read_record(model_dir / CONFIG_FILE)[1]
    files = marker.get("files")
    if isinstance(files, dict) and any(rel.startswith(f"{MODEL_DIR}/") for rel in files):
        problem = inventory_problem(ckpt_dir, files, select=lambda rel: rel.startswith(f"{MODEL_DIR}/"))
    elif isinstance(files, dict):
        return f"{model_dir} is not consolidated yet"
    else:
        try:
            if any(f.stat().st_size == 0 for f in weight_files(model_dir)):
                raise DataError(f"{model_dir / WEIGHTS_FILE} is empty")
        except DataError:
            problem = f"{model_dir / WEIGHTS_FILE} is missing or empty"
    return problem or read_record(model_dir / CONFIG_FILE)[1]


def _consolidated(ckpt_dir: Path) -> Path:
    """The model directory of a whole checkpoint saved without one: made now from its DeepSpeed
    files (:func:`consolidate_checkpoint`), or a DataError naming the command when that fails."""
    try:
        return consolidate_checkpoint(ckpt_dir)
    except OSError as exc:
        raise DataError(
            f"checkpoint {ckpt_dir} has no model directory yet and it cannot be written there "
            f"({exc.strerror or exc}); run `python launcher/consolidate.py {ckpt_dir} --out <dir>` "
            "and pass <dir>") from None


def _unconsolidated(ckpt_dir: Path) -> bool:
    """A complete checkpoint whose model directory is left to consolidation (not written yet,
    or left unfinished by a crash during consolidation)."""
    marker = read_record(ckpt_dir / MARKER)[0]
    if marker is None or not (ckpt_dir / MODEL_FILES).is_dir():
        return False
    files = marker.get("files")
    saved_in_marker = isinstance(files, dict) and any(rel.startswith(f"{MODEL_DIR}/") for rel in files)
    return not saved_in_marker and not (ckpt_dir / MODEL_DIR / MARKER).is_file()


def _checkpoint_model_dir(ckpt_dir: Path) -> Path:
    """The model directory of a checkpoint named explicitly: used if whole, else an error (no
    fallback: the user chose this one)."""
    if not (ckpt_dir / MARKER).is_file():
        log.warning("%s has no %s (its save did not finish); using its model directory as it is",
                    ckpt_dir, MARKER)
        return ckpt_dir / MODEL_DIR
    problem = _checkpoint_model_problem(ckpt_dir)
    if problem:
        raise DataError(f"the model directory of checkpoint {ckpt_dir} is damaged: {problem}; pass "
                        "another checkpoint, or the run directory (its newest whole one is used)")
    return ckpt_dir / MODEL_DIR


def _run_model_dir(run_dir: Path) -> Path:
    latest = run_dir / LATEST
    if latest.is_file():
        record, problem = read_record(latest)
        if record is None:
            log.warning("%s; using the newest complete checkpoint in %s", problem, run_dir / CHECKPOINTS)
        else:
            for key in ("model_dir", "checkpoint"):
                value = record.get(key)
                if isinstance(value, str) and resolve_record(run_dir, value) is None:
                    log.warning("%s names %s, outside this run directory (written before the "
                                "directory was moved or copied); using the checkpoints inside %s",
                                latest, value, run_dir)
                    break
    skipped: list[str] = []
    for ckpt_dir in marked_checkpoints(run_dir):
        marker = read_record(ckpt_dir / MARKER)[0]
        files = marker.get("files") if marker is not None else None
        saved_model = (ckpt_dir / MODEL_DIR).is_dir() or (
            isinstance(files, dict) and any(rel.startswith(f"{MODEL_DIR}/") for rel in files))
        if _unconsolidated(ckpt_dir):
            try:
                return _consolidated(ckpt_dir)
            except DataError as exc:
                problem = str(exc)
                log.warning("skipping checkpoint %s: %s", ckpt_dir.name, problem)
                skipped.append(f"{ckpt_dir.name}: {problem}")
                continue
        if marker is not None and not saved_model:
            continue  # saved by an older version with checkpoint.write_model_dir=false
        problem = _checkpoint_model_problem(ckpt_dir)
        if problem is None:
            return ckpt_dir / MODEL_DIR
        log.warning("skipping damaged checkpoint %s: %s", ckpt_dir.name, problem)
        skipped.append(f"{ckpt_dir.name}: {problem}")
    if skipped:
        raise DataError(f"{run_dir} has no checkpoint with a whole model directory ({'; '.join(skipped)}); "
                        "pass a model directory, or resume the run to write a new checkpoint")
    raise DataError(f"{run_dir} is a run directory without a complete checkpoint with a model directory "
                    "yet; wait for the first checkpoint or pass a model directory")


def _config_shape(cfg: ModelConfig) -> tuple:
    return (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim,
            cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings)


def hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory (one file or the shards its index
    names); a directory holding only pickled weights is refused (never unpickled)."""
    index = path / HF_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / HF_WEIGHTS_FILE).is_file():
        return [path / HF_WEIGHTS_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise DataError(
            f"{path} holds only pickled PyTorch weights, which are never loaded (they can run "
            "code); convert them to safetensors first (e.g. save_pretrained(..., "
            "safe_serialization=True) in a trusted environment)"
        )
    raise DataError(f"{path} has {HF_CONFIG_FILE} but no {HF_WEIGHTS_FILE} or {HF_INDEX_FILE}")


def read_hf_config(path: str | Path) -> ModelConfig:
    """Our config of a Hugging Face Llama directory (its ``config.json``; the record of our own
    config when this package exported it and the shapes agree), without reading any weights."""
    path = Path(path)
    try:
        hf_cfg = json.loads((path / HF_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path / HF_CONFIG_FILE}: {exc}") from None
    cfg = from_hf_config(hf_cfg)
    ours = path / EXPORTED_CONFIG_FILE
    if ours.is_file():  # exported by us: keep the preset and init settings of the record
        recorded = ModelConfig.model_validate_json(ours.read_text(encoding="utf-8"))
        if _config_shape(recorded) == _config_shape(cfg):
            cfg = recorded
        else:
            log.warning("%s disagrees with config.json (edited?); using config.json", ours)
    return cfg


def read_hf_dir(path: str | Path, device: torch.device | str = "cpu"
                ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and state dict (our tensor names) from a Hugging Face Llama directory."""
    from safetensors import safe_open

    path = Path(path)
    cfg = read_hf_config(path)
    hf_state: dict[str, torch.Tensor] = {}
    for file in hf_weight_files(path):
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


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, ModelConfig]:
    """Load a model directory (or a Hugging Face Llama directory, or the latest model of a run
    directory: see :func:`find_model_dir`) into a :class:`Transformer`."""
    path = find_model_dir(path) if Path(path).is_dir() else Path(path)
    if is_model_dir(path):
        cfg = read_model_config(path)
        if not (path / WEIGHTS_FILE).is_file() and not (path / INDEX_FILE).is_file():
            raise DataError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")
        state_dict = load_weights(path, device)
    elif (path / HF_CONFIG_FILE).is_file():
        cfg, state_dict = read_hf_dir(path, device=device)
    else:
        raise DataError(
            f"{path} is not a model directory: expected {CONFIG_FILE} + {WEIGHTS_FILE} (this "
            "project's model directory) or config.json + safetensors (a Hugging Face Llama directory)"
        )
    return model_from_state_dict(cfg, state_dict, device), cfg


# ------------------------------------------ consolidation of a checkpoint into a model directory

def is_task_dir(path: str | Path) -> bool:
    return (Path(path) / TASK_FILE).is_file()


def write_task_weights(out: str | Path, weights: Weights, cfg: ModelConfig,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The weights of a task model directory from a head module's (full, fp32) weights, a mapping
    or an iterator of ``(name, tensor)``: the backbone (``model.*``) streams into its shards one
    tensor at a time; the head's own tensors are collected for ``head.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out)
    head: dict[str, torch.Tensor] = {}

    def backbone() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in (weights.items() if isinstance(weights, Mapping) else weights):
            if name.startswith("model."):
                yield name.removeprefix("model."), tensor
            else:
                head[name] = tensor.detach().float().cpu().contiguous()

    write_weights(out, backbone(), cfg, max_shard_bytes)
    with atomic_path(out / HEAD_FILE) as tmp:
        save_file(head, str(tmp))


def model_dir_problem(model_dir: Path) -> str | None:
    """Why a consolidated model directory is not whole (one line), or None: its own marker reads
    and lists every file with its size."""
    marker, problem = read_record(model_dir / MARKER)
    if marker is None:
        return problem
    return inventory_problem(model_dir, marker.get("files") or {})


def consolidate_checkpoint(ckpt_dir: str | Path, out: str | Path | None = None,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the model directory of a checkpoint (default ``<ckpt>/model``) from its DeepSpeed
    files and its ``model_files`` (config, tokenizer, provenance, task.json), one output shard at
    a time; returns it. Extra memory: the largest tensor plus one output shard.

    Written with its own ``COMPLETE.json`` (listing its files; the checkpoint's marker is left as
    it is) under ``<out>.<pid>.tmp``, then renamed; a whole one already there is kept, so
    several processes (the ranks of a fine-tune given a run directory) may consolidate at once.
    """
    from model.zero_checkpoint import iter_fp32_weights

    ckpt_dir = Path(ckpt_dir)
    out = Path(out) if out is not None else ckpt_dir / MODEL_DIR
    if out.is_dir() and model_dir_problem(out) is None:
        return out
    files_dir = ckpt_dir / MODEL_FILES
    if not (files_dir / "model_config.json").is_file():
        raise DataError(f"{ckpt_dir} has no {MODEL_FILES}/model_config.json (saved by an older version, "
                        "or not a checkpoint directory); pass a checkpoint directory written by this "
                        "project, or a run directory")
    start = time.perf_counter()
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # own name: ranks may consolidate at once
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(files_dir, tmp)
    cfg = read_model_config(files_dir)
    stats: dict[str, int] = {}
    write = write_task_weights if is_task_dir(files_dir) else write_weights
    write(tmp, iter_fp32_weights(ckpt_dir, stats), cfg, max_shard_bytes)
    atomic_write_json(tmp / MARKER, {"source": ckpt_dir.name,
                                     "files": file_inventory(tmp, skip=lambda rel: rel == MARKER)})
    if out.is_dir() and model_dir_problem(out) is None:  # another process finished first
        shutil.rmtree(tmp)
        return out
    if out.exists():
        shutil.rmtree(out)  # a damaged or unfinished one
    os.replace(tmp, out)
    log.info("consolidated %s into %s in %.2f s (%.1f MB read)", ckpt_dir, out,
             time.perf_counter() - start, stats.get("bytes_read", 0) / 1e6)
    return out
