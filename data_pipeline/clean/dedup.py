"""Exact and MinHash-LSH near-duplicate detection, deterministic and across all inputs of a run.

Workers compute, per kept document, a 128-bit hash of its normalised text (lower case,
whitespace collapsed) and a MinHash signature over word shingles (``shingle_size`` words;
``bands x rows`` seeded permutations of a 32-bit shingle hash). They are stored per input as
raw row files. :func:`find_duplicates` then walks the run in its fixed global order: an exact
duplicate of an earlier document is dropped (``dedup.exact``); among the rest, documents that
share all ``rows`` values of any band are joined into clusters (union-find) and every member
but the first in run order is dropped (``dedup.near``). Like FineWeb, candidate pairs are not
re-verified by Jaccard similarity.

Memory: the band pass holds one band of all signatures (``4 * rows`` bytes per document, read
from the memory-mapped per-input files) plus 8 bytes per document for the cluster roots;
16 bytes per document for the exact hashes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import xxhash

from data_pipeline.clean.config import DedupConfig

MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")
_BLOCK = 4096  # shingles hashed at once: 4096 x 112 x 8 bytes = 3.7 MB


def normalize_for_hash(text: str) -> str:
    return " ".join(text.lower().split())


def exact_hash(text: str) -> tuple[int, int]:
    """128-bit xxh3 hash of the normalised text as two unsigned 64-bit halves."""
    digest = xxhash.xxh3_128_intdigest(normalize_for_hash(text).encode("utf-8"))
    return digest >> 64, digest & 0xFFFFFFFFFFFFFFFF


class MinHasher:
    """Seeded MinHash over word shingles; the same seed and config give the same signatures."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.shingle_size = cfg.shingle_size
        n = cfg.bands * cfg.rows
        rng = np.random.default_rng(cfg.seed)
        # a < 2^31 and shingle hashes < 2^32 keep a*x + b below 2^64 (no overflow).
        self.a = rng.integers(1, 1 << 31, size=n, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=n, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        k = self.shingle_size
        grams = {" ".join(words[i:i + k]) for i in range(max(len(words) - k + 1, 1))}
        return np.fromiter((xxhash.xxh32_intdigest(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))

    def signature(self, text: str) -> np.ndarray:
        """(bands * rows,) uint32 signature."""
        x = self.shingles(text)
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(x), _BLOCK):  # blocks keep a long document's memory small
            block = x[start:start + _BLOCK, None]
            np.minimum(sig, ((block * self.a[None, :] + self.b[None, :]) % MERSENNE).min(axis=0), out=sig)
        return (sig & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def find_root(parent: np.ndarray, i: int) -> int:
    """Root of ``i`` in the union-find forest ``parent`` (compressing the path on the way)."""
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def load_rows(path: Path, dtype: type, width: int) -> np.ndarray:
    """Memory-map a raw file of fixed-width rows written by the cleaning workers."""
    if Path(path).stat().st_size == 0:
        return np.zeros((0, width), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r").reshape(-1, width)


def find_duplicates(exact_files: list[Path], sig_files: list[Path], cfg: DedupConfig) -> dict[int, str]:
    """Global document index -> ``dedup.exact`` / ``dedup.near`` for every document to drop.

    ``exact_files`` hold two uint64 per document, ``sig_files`` ``bands * rows`` uint32 per
    document (raw rows, see :func:`load_rows`). Indices count the documents of all files in
    the given order.
    """
    dropped: dict[int, str] = {}
    if cfg.exact and exact_files:
        hashes = np.concatenate([load_rows(f, np.uint64, 2) for f in exact_files])
        if len(hashes):
            keys = np.ascontiguousarray(hashes).view(np.dtype((np.void, 16))).ravel()
            _, first = np.unique(keys, return_index=True)
            is_first = np.zeros(len(keys), bool)
            is_first[first] = True  # np.unique returns the first occurrence of each key
            for i in np.flatnonzero(~is_first):
                dropped[int(i)] = "dedup.exact"
    if not cfg.near or not sig_files:
        return dropped
    sigs = [load_rows(f, np.uint32, cfg.bands * cfg.rows) for f in sig_files]
    n = sum(len(s) for s in sigs)
    if n == 0:
        return dropped
    alive = np.ones(n, bool)
    alive[list(dropped)] = False
    parent = np.arange(n, dtype=np.int64)
    for band in range(cfg.bands):
        cols = slice(band * cfg.rows, (band + 1) * cfg.rows)
        rows = np.concatenate([np.ascontiguousarray(s[:, cols]) for s in sigs if len(s)])
        keys = rows.view(np.dtype((np.void, 4 * cfg.rows))).ravel()
        idx = np.flatnonzero(alive)
        _, inverse = np.unique(keys[idx], return_inverse=True)
        first = np.full(inverse.max() + 1 if len(inverse) else 0, n, dtype=np.int64)
        np.minimum.at(first, inverse, idx)
        group_first = first[inverse]
        linked = idx != group_first  # only documents sharing this band with an earlier one
        for i, f in zip(idx[linked].tolist(), group_first[linked].tolist()):
            ri, rf = find_root(parent, i), find_root(parent, f)
            if ri != rf:
                parent[max(ri, rf)] = min(ri, rf)
    for i in np.flatnonzero(alive & (parent != np.arange(n))).tolist():
        if find_root(parent, i) != i:
            dropped[i] = "dedup.near"
    return dropped
