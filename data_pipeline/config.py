"""Root config of the data-preparation stages (``configs/data/*.yaml``).

The same recipe drives ``clean``, ``build_tokenizer``, ``shard`` and ``prepare_data``.
"""

from __future__ import annotations

from pydantic import Field

from crucible.config import Section
from data_pipeline.tokenizer_config import ShardConfig, TokenizerConfig


class CleanConfig(Section):
    """Cleaning: readers, extraction, normalisation, filters, dedup, output (section ``data``)."""


class DataPrepConfig(Section):
    """Root config of launcher/clean.py, build_tokenizer.py, shard.py and prepare_data.py."""

    input: str | None = None
    """clean/prepare_data: raw input file, folder or glob; build_tokenizer/shard: clean shard folder."""
    output: str | None = None
    """Output folder of the stage (prepare_data: root with clean/, tokenizer/, shards/ inside)."""
    tokenizer_dir: str | None = None
    """shard: folder written by build_tokenizer."""
    data: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
