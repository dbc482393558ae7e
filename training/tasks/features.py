"""Token features of fine-tune data: the model's tokenizer, ``datasets.map`` over every split, and
rows for collation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from crucible.errors import DataError
from training.tasks.base import TaskKind
from training.tasks.data import SPLITS, TaskData


def load_tokenizer(model_dir: Path) -> Any:
    """The Hugging Face fast tokenizer saved with the model (offsets need the fast one)."""
    from transformers import AutoTokenizer

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
        out[split] = ds.map(fn, batched=True, remove_columns=ds.column_names,
                            desc=f"featurize {split}", load_from_cache_file=False)
    return out


def feature_rows(features: datasets.Dataset) -> list[dict[str, Any]]:
    """The rows of a feature split as dicts (read column by column: much faster than per row)."""
    return [dict(zip(features.column_names, values)) for values in zip(
        *(features[c] for c in features.column_names))]
