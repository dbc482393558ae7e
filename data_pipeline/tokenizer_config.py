"""Configuration of tokenizer training (section ``tokenizer``) and token sharding (section ``shard``)."""

from __future__ import annotations

from crucible.config import Section


class TokenizerConfig(Section):
    """sentencepiece tokenizer training (section ``tokenizer``)."""

    vocab_size: int = 8000
    """Vocabulary size, special tokens included."""


class ShardConfig(Section):
    """Tokenize + pack + write token shards (section ``shard``)."""

    seq_len: int = 256
    """Tokens per training sequence; each sample holds seq_len + 1 tokens."""
