"""The model directory: the one on-disk form every tool reads.

::

    model.safetensors      weights, this package's tensor names (a tied output head is stored once)
    model_config.json      the resolved ModelConfig
    tokenizer.model ...    the tokenizer files (sentencepiece + Hugging Face), copied in
    provenance.json        where the weights came from (code, library versions, config)

:func:`load_model_dir` also reads a Hugging Face Llama directory (``config.json`` +
safetensors), for continued pretraining from public weights. Nothing here unpickles.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from crucible.errors import DataError
from crucible.fileio import atomic_path, atomic_write_json
from model.config import ModelConfig
from model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
PROVENANCE_FILE = "provenance.json"
# Files of a tokenizer folder that travel with the weights (those present are copied).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)
TIED_KEY = "lm_head.weight"


def expected_keys(cfg: ModelConfig) -> list[str]:
    """Tensor names of a saved model directory for ``cfg`` (tied head not stored)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    keys = list(model.state_dict().keys())
    return [k for k in keys if not (cfg.tie_embeddings and k == TIED_KEY)]


def _clean_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = dict(state_dict)
    if cfg.tie_embeddings:
        sd.pop(TIED_KEY, None)
    want = set(expected_keys(cfg))
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the model config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (keys must be this package's parameter names, without a 'module.' prefix)"
        )
    return {k: sd[k].detach().to("cpu").contiguous() for k in sorted(sd)}


def save_model_dir(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory: safetensors weights, ``model_config.json``, the tokenizer files
    found in ``tokenizer_dir`` and ``provenance.json`` (``provenance`` or one made now).

    Every file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _clean_state_dict(state_dict, cfg)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
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
    itself, a checkpoint directory holding ``model/``, or a run directory, whose
    ``latest.json`` names the newest complete checkpoint's model directory."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} does not exist or is not a directory (pass a model directory, "
                        "a Hugging Face Llama directory or a run directory)")
    if is_model_dir(path) or (path / "config.json").is_file():
        return path
    if is_model_dir(path / "model"):
        return path / "model"
    latest = path / "latest.json"
    if latest.is_file():
        try:
            info = json.loads(latest.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{latest} is not valid JSON: {exc}") from None
        candidates = []
        if info.get("model_dir"):
            candidates.append(Path(info["model_dir"]))
        if info.get("tag"):  # the run directory may have moved since latest.json was written
            candidates.append(path / "checkpoints" / str(info["tag"]) / "model")
        for candidate in candidates:
            if is_model_dir(candidate):
                return candidate
        raise DataError(f"{latest} names no existing model directory (tried {[str(c) for c in candidates]})")
    if (path / "checkpoints").is_dir() or (path / "deepspeed_config.json").is_file():
        raise DataError(f"{path} is a run directory without a complete checkpoint yet (no "
                        "latest.json); wait for the first checkpoint or pass a model directory")
    return path


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, ModelConfig]:
    """Load a model directory (or a Hugging Face Llama directory, or the latest model of a run
    directory: see :func:`find_model_dir`) into a :class:`Transformer`."""
    from safetensors.torch import load_file

    path = find_model_dir(path) if Path(path).is_dir() else Path(path)
    if is_model_dir(path):
        cfg = read_model_config(path)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise DataError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
        state_dict = load_file(str(weights), device=str(device))
    elif (path / "config.json").is_file():
        from model.hf import read_hf_dir

        cfg, state_dict = read_hf_dir(path, device=device)
    else:
        raise DataError(
            f"{path} is not a model directory: expected {CONFIG_FILE} + {WEIGHTS_FILE} (this "
            "project's model directory) or config.json + safetensors (a Hugging Face Llama directory)"
        )
    return model_from_state_dict(cfg, state_dict, device), cfg
