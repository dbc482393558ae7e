"""The token-shard stage: the documents of a finished cleaning run, encoded with a trained
tokenizer, into token shards (on this machine, or each clean shard encoded by a Ray task)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crucible.config import config_to_dict
from crucible.errors import DataError
from crucible.fileio import sha256_file
from data_pipeline.clean.output import clean_shard_paths, iter_clean_documents
from data_pipeline.config import DataPrepConfig
from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.encode_ray import encode_on_ray
from data_pipeline.shards.manifest import MANIFEST_FILE
from data_pipeline.shards.writer import write_token_shards
from data_pipeline.tokenizer.folder import MODEL_FILE


def is_complete(out_dir: str | Path) -> bool:
    """The manifest is written last: its presence marks a finished shard folder."""
    return (Path(out_dir) / MANIFEST_FILE).is_file()


def is_up_to_date(out_dir: str | Path, tokenizer_dir: str | Path, cfg: ShardConfig) -> bool:
    """Complete, and made with this tokenizer (by checksum) and these shard settings."""
    if not is_complete(out_dir):
        return False
    manifest = json.loads((Path(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    model = Path(tokenizer_dir) / MODEL_FILE
    return (model.is_file() and manifest.get("tokenizer", {}).get("sha256") == sha256_file(model)
            and manifest.get("shard_config") == config_to_dict(cfg))


def run_shard(cfg: DataPrepConfig) -> dict[str, Any]:
    """Stage entry: encode the clean shards in ``cfg.input`` with ``cfg.tokenizer_dir``."""
    if not cfg.input or not cfg.output or not cfg.tokenizer_dir:
        raise DataError("shard needs input=<clean shard folder> tokenizer_dir=<folder> output=<folder>")
    paths = clean_shard_paths(cfg.input)  # fail early, before any output is touched
    if cfg.executor == "ray":
        encoded = encode_on_ray(paths, cfg.tokenizer_dir, cfg.shard, cfg.ray)
        return write_token_shards((), cfg.tokenizer_dir, cfg.output, cfg.shard, root_cfg=cfg, encoded=encoded)
    texts = (doc["text"] for doc in iter_clean_documents(cfg.input))
    return write_token_shards(texts, cfg.tokenizer_dir, cfg.output, cfg.shard, root_cfg=cfg)
