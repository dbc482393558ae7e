"""Packing: documents (token ids + EOS) joined end to end into fixed-length samples.

Samples hold exactly ``seq_len + 1`` tokens (inputs and shifted targets); there is no padding.
Tokens that do not fill a sample carry over to the next document; whatever is left when a split
ends is the *tail*, dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crucible.errors import ConfigError
from data_pipeline.tokenizer.sample import text_hash


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit choice is checked."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ConfigError(f"shard.dtype={requested} cannot hold a vocabulary of {vocab_size} ids")
    return dtype


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters whose concatenation is ``text``.

    Cuts go after the last newline in a piece, else before the last space (so the space stays
    with the following word, as sentencepiece encodes it), else at ``max_chars``.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, end)
        if cut >= 0:
            cut += 1
        else:
            cut = text.rfind(" ", start + max_chars // 2, end)
            if cut <= start:
                cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """Deterministic split by a seeded hash of the text (duplicates land in the same split)."""
    if fraction <= 0:
        return False
    return text_hash(text, seed) < fraction * float(1 << 64)


class Packer:
    """Accumulates token ids and cuts them into ``(n, seq_len + 1)`` sample arrays."""

    def __init__(self, seq_len: int, dtype: np.dtype) -> None:
        self.sample_len = seq_len + 1
        self.dtype = np.dtype(dtype)
        self._carry = np.zeros(0, dtype=self.dtype)
        self.documents = 0
        self.tokens_in = 0

    def add(self, documents: Sequence[np.ndarray]) -> np.ndarray:
        """Append documents (each already ending in EOS); return the samples now complete."""
        if not documents:
            return np.zeros((0, self.sample_len), dtype=self.dtype)
        self.documents += len(documents)
        joined = np.concatenate([self._carry, *documents]).astype(self.dtype, copy=False)
        self.tokens_in += len(joined) - len(self._carry)
        n = len(joined) // self.sample_len
        self._carry = joined[n * self.sample_len:].copy()
        return joined[: n * self.sample_len].reshape(n, self.sample_len)

    @property
    def tail_tokens(self) -> int:
        """Tokens waiting for a sample; dropped (and recorded) when the split ends."""
        return len(self._carry)
