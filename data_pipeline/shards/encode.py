"""Encoding documents into token ids, in fixed batches, with EOS after every document.

Determinism: documents are encoded in fixed batches by sentencepiece's own thread pool, which
returns ids in input order, so the ids are identical for any ``shard.workers``; encoding one
document does not depend on which documents share its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.packing import is_validation, split_text

EncodedBatch = tuple[list[np.ndarray], list[bool], int]
"""Token arrays of consecutive documents (EOS appended), their validation flags, pieces split off."""


def encode_batch(sp: spm.SentencePieceProcessor, texts: list[str], cfg: ShardConfig, eos: int,
                 dtype: np.dtype) -> tuple[list[np.ndarray], int]:
    """Encode documents (long ones split first) and append EOS; returns arrays and split count."""
    pieces: list[str] = []
    owner: list[int] = []
    for d, text in enumerate(texts):
        parts = split_text(text, cfg.max_chunk_chars)
        pieces.extend(parts)
        owner.extend([d] * len(parts))
    ids = sp.encode(pieces, num_threads=cfg.workers)
    per_doc: list[list[int]] = [[] for _ in texts]
    for d, piece_ids in zip(owner, ids, strict=True):
        per_doc[d].extend(piece_ids)
    arrays = []
    for doc_ids in per_doc:
        doc_ids.append(eos)
        arrays.append(np.asarray(doc_ids, dtype=dtype))
    return arrays, len(pieces) - len(texts)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_texts(texts: Iterable[str], sp: spm.SentencePieceProcessor, cfg: ShardConfig, eos: int,
                 dtype: np.dtype) -> Iterator[EncodedBatch]:
    """``texts`` in batches of ``shard.batch_documents``: token arrays, validation flags, pieces split off."""
    for batch in _batches(texts, cfg.batch_documents):
        arrays, n_split = encode_batch(sp, batch, cfg, eos, dtype)
        flags = [is_validation(text, cfg.validation_fraction, cfg.split_seed) for text in batch]
        yield arrays, flags, n_split
