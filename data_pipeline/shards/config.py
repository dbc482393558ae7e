"""Configuration of token sharding (section ``shard``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from crucible.config import Section


class ShardConfig(Section):
    """Tokenize + pack + write token shards (section ``shard``)."""

    seq_len: int = Field(256, gt=0)
    """Tokens per training sequence; each sample holds seq_len + 1 tokens."""
    samples_per_shard: int = Field(2048, gt=0)
    """Packed samples per shard tar (the last shard of a split may hold fewer)."""
    validation_fraction: float = Field(0.01, ge=0, lt=1)
    """Share of documents (chosen by a hash of their text) that go to the validation split."""
    split_seed: int = 0
    """Seed of the document hash that picks the validation split."""
    max_chunk_chars: int = Field(100_000, ge=1000)
    """Documents longer than this are split (at a line or space) before encoding, so cost stays linear."""
    workers: int = Field(2, gt=0)
    """Threads sentencepiece encodes each batch of documents with (output is identical for any value)."""
    batch_documents: int = Field(1024, gt=0)
    """Documents encoded per batch."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token dtype in the shards; auto: uint16 when the vocabulary fits, else uint32."""
