"""The one place that chains the data stages: ``prepare_data`` runs clean -> tokenizer -> shards."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from crucible.errors import DataError
from data_pipeline.clean.output import is_complete as clean_is_complete
from data_pipeline.clean.stage import run_clean
from data_pipeline.config import DataPrepConfig
from data_pipeline.shards.manifest import MANIFEST_FILE
from data_pipeline.shards.stage import is_up_to_date as shards_are_up_to_date
from data_pipeline.shards.stage import run_shard
from data_pipeline.tokenizer.folder import is_up_to_date as tokenizer_is_up_to_date
from data_pipeline.tokenizer.stage import run_build_tokenizer

log = logging.getLogger("crucible.prepare_data")


def run_prepare_data(cfg: DataPrepConfig) -> dict[str, Any]:
    """clean -> tokenizer -> shards under ``cfg.output`` (``clean/``, ``tokenizer/``, ``shards/``).

    Each step is skipped when its output is complete and was made with the same settings
    (cleaning decides that itself, from its own marker and work folder).
    """
    if not cfg.output:
        raise DataError("prepare_data needs output=<root folder> (clean/, tokenizer/, shards/ go inside)")
    root = Path(cfg.output)
    clean_dir, shard_dir = root / "clean", root / "shards"
    tok_dir = Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else root / "tokenizer"
    steps: dict[str, str] = {}

    if clean_is_complete(clean_dir):
        steps["clean"] = "skipped (complete)"
    else:
        run_clean(cfg.model_copy(update={"output": str(clean_dir)}))
        steps["clean"] = "done"
    stage_cfg = cfg.model_copy(update={"input": str(clean_dir), "tokenizer_dir": str(tok_dir)})
    if tokenizer_is_up_to_date(tok_dir, cfg.tokenizer):
        steps["tokenizer"] = "skipped (complete)"
    else:
        run_build_tokenizer(stage_cfg.model_copy(update={"output": str(tok_dir)}))
        steps["tokenizer"] = "done"
    if shards_are_up_to_date(shard_dir, tok_dir, cfg.shard):
        steps["shards"] = "skipped (complete)"
    else:
        run_shard(stage_cfg.model_copy(update={"output": str(shard_dir)}))
        steps["shards"] = "done"
    for step, what in steps.items():
        log.info("%s: %s", step, what)
    return {"steps": steps, "clean": str(clean_dir), "tokenizer": str(tok_dir),
            "manifest": str(shard_dir / MANIFEST_FILE)}
