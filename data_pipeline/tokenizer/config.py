"""Configuration of tokenizer training (section ``tokenizer``) and the special-token ids."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crucible.config import Section

# sentencepiece ids: the Llama layout (unk 0, bos 1, eos 2) plus a pad id.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
BYTE_PIECES = 256


class TokenizerConfig(Section):
    """sentencepiece tokenizer training (section ``tokenizer``)."""

    vocab_size: int = Field(8000, ge=NUM_SPECIAL + BYTE_PIECES + 8)
    """Vocabulary size, special tokens and the 256 byte-fallback pieces included."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """sentencepiece algorithm: bpe or unigram."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as UTF-8 byte pieces instead of <unk>."""
    split_digits: bool = True
    """Every digit is its own piece (helps arithmetic; the usual LLM choice)."""
    add_dummy_prefix: bool = False
    """Prefix a space to every text before encoding (sentencepiece's default, Llama 1/2 style).
    Off by default, so that decoding the ids of a document gives back its exact text."""
    user_defined_symbols: list[str] = Field(default_factory=list)
    """Strings always kept as one piece (e.g. '<|im_start|>')."""
    character_coverage: float = Field(0.9995, ge=0.98, le=1)
    """Share of characters covered by the vocabulary (sentencepiece allows 0.98 to 1); the rest
    fall back to bytes. Every covered character needs a vocabulary entry, so multilingual text
    needs a larger vocab_size."""
    max_sentence_length: int = Field(16384, ge=256)
    """Longest training line in bytes; longer lines are split (never dropped) before training."""
    sample_documents: int = Field(100_000, gt=0)
    """Documents drawn (seeded, one streaming pass, bounded memory) to train on."""
    sample_bytes: int = Field(200_000_000, gt=0)
    """Upper bound on the UTF-8 bytes of the training sample held in memory."""
    heldout_documents: int = Field(200, ge=0)
    """Documents held back from training to measure bytes per token and tokens per word (at
    most a tenth of the sample)."""
    seed: int = 1234
    """Seed of the document sample."""
    num_threads: int = Field(2, gt=0)
    """Threads sentencepiece trains with."""

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if len(set(self.user_defined_symbols)) != len(self.user_defined_symbols):
            raise ValueError(
                f"tokenizer.user_defined_symbols has duplicates: {self.user_defined_symbols}"
            )
        extra = NUM_SPECIAL + (BYTE_PIECES if self.byte_fallback else 0) + len(self.user_defined_symbols)
        if self.vocab_size <= extra:
            raise ValueError(
                f"tokenizer.vocab_size ({self.vocab_size}) must exceed the {extra} reserved pieces "
                "(4 special, 256 byte-fallback, user-defined symbols)"
            )
        return self
