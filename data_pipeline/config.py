"""Root config of the data-preparation stages (``configs/data/*.yaml``).

The same recipe drives ``clean``, ``build_tokenizer``, ``shard`` and ``prepare_data``. Each stage
defines its own section in its ``config.py`` (``data``, ``tokenizer``, ``shard``, ``ray``); this
root combines them with the top-level keys the stage scripts share.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from crucible.config import Section
from data_pipeline.clean.config import CleanConfig
from data_pipeline.executors.config import RayConfig
from data_pipeline.shards.config import ShardConfig
from data_pipeline.tokenizer.config import TokenizerConfig


class DataPrepConfig(Section):
    """Root config of launcher/clean.py, build_tokenizer.py, shard.py and prepare_data.py."""

    input: str | None = None
    """clean/prepare_data: raw input file, folder or glob; build_tokenizer/shard: clean shard folder."""
    output: str | None = None
    """Output folder of the stage (prepare_data: root with clean/, tokenizer/, shards/ inside)."""
    tokenizer_dir: str | None = None
    """shard: folder written by build_tokenizer."""
    executor: Literal["local", "ray"] = "local"
    """clean/shard/prepare_data: where the per-file work runs (local worker processes, or a Ray cluster; see ray)."""
    workers: int = Field(default=0, ge=0)
    """clean: worker processes (0: one per CPU core); the output does not depend on it."""
    strict: bool = False
    """clean: stop at the first bad input record (naming file and offset) instead of counting it."""
    data: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
