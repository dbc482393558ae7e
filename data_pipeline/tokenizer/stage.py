"""The tokenizer stage: train on the documents of a finished cleaning run."""

from __future__ import annotations

from typing import Any

from crucible.errors import DataError
from data_pipeline.clean.output import clean_shard_paths, iter_clean_documents
from data_pipeline.config import DataPrepConfig
from data_pipeline.tokenizer.train import train_tokenizer


def run_build_tokenizer(cfg: DataPrepConfig) -> dict[str, Any]:
    """Stage entry: train on the clean shards in ``cfg.input``, write ``cfg.output``."""
    if not cfg.input or not cfg.output:
        raise DataError("build_tokenizer needs input=<clean shard folder> and output=<folder>")
    clean_shard_paths(cfg.input)  # fail early, before any output is touched
    texts = (doc["text"] for doc in iter_clean_documents(cfg.input))
    return train_tokenizer(texts, cfg.tokenizer, cfg.output, root_cfg=cfg)
