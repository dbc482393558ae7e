"""Token features of fine-tune data: the model to start from and its tokenizer, ``datasets.map``
over every split, and rows for collation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from crucible.errors import DataError
from model.io import HF_CONFIG_FILE, find_model_dir, is_model_dir
from training.tasks.base import TaskKind
from training.tasks.data import SPLITS, TaskData

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
"""A model directory holds at least one of these (the Hugging Face fast tokenizer, or the
sentencepiece model it is built from)."""


def _folder_kind(path: Path) -> str:
    """What a folder that is not a model holds, in words (for the error message)."""
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not names:
        return "the folder is empty"
    if any(name in names for name in TOKENIZER_FILES):
        return "it is a tokenizer folder (launcher/build_tokenizer.py), which holds no model weights"
    if "manifest.json" in names:
        return "it holds token shards (launcher/shard.py), the data to pretrain on, not a model"
    if "_SUCCESS" in names or any(name.startswith("docs-") for name in names):
        return "it holds cleaned documents (launcher/clean.py), not a model"
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} entries)" if len(names) > 6 else "")
    return f"it holds no model files ({shown})"


def find_init_model(init_from: str | Path) -> Path:
    """The model directory ``init_from`` names (a run directory's newest model, a model directory
    or a Hugging Face Llama directory; see :func:`model.io.find_model_dir`), checked to hold a
    model and its tokenizer, so a wrong folder is named as such before anything is loaded."""
    model_dir = find_model_dir(init_from)
    if not (is_model_dir(model_dir) or (model_dir / HF_CONFIG_FILE).is_file()):
        raise DataError(
            f"init_from={init_from} is not a model: {_folder_kind(model_dir)}. init_from takes a "
            "pretraining or fine-tune run directory (latest.json, checkpoints/), a model directory "
            "(model_config.json, model.safetensors and tokenizer files, e.g. <run_dir>/checkpoints/step_00000100/model) "
            "or a Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)"
        )
    _require_tokenizer_files(model_dir)
    return model_dir


def _require_tokenizer_files(model_dir: Path) -> None:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(
            f"{model_dir} holds a model but no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the tokenizer folder it was trained with into it "
            "(launcher/build_tokenizer.py writes both)"
        )


def load_tokenizer(model_dir: Path) -> Any:
    """The Hugging Face fast tokenizer saved with the model (offsets need the fast one)."""
    from transformers import AutoTokenizer

    _require_tokenizer_files(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"the tokenizer of {model_dir} is not a fast tokenizer (offsets are needed)")
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise DataError(f"the tokenizer of {model_dir} defines no pad or eos token")
    return tok


def featurize(data: TaskData, task: TaskKind, tokenizer: Any) -> dict[str, datasets.Dataset]:
    """Token features of every split (``datasets.map``, batched)."""

    def fn(batch: dict) -> dict:
        return task.featurize(batch, tokenizer, data.labels, tokenizer.eos_token_id)

    out = {}
    for split in SPLITS:
        ds = data.split(split)
        out[split] = ds.map(fn, batched=True, remove_columns=ds.column_names, features=task.feature_types(),
                            desc=f"featurize {split}", load_from_cache_file=False)
    return out


def feature_rows(features: datasets.Dataset) -> list[dict[str, Any]]:
    """The rows of a feature split as dicts (read column by column: much faster than per row)."""
    return [dict(zip(features.column_names, values)) for values in zip(
        *(features[c] for c in features.column_names))]
