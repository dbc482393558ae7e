"""Counting repeats: repeated lines or paragraphs, and the n-gram repetition measures of Gopher.

Shared by the Gopher repetition rules and FineWeb's duplicated-character rule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import numpy as np

NUMPY_MIN_WORDS = 400  # below this many words plain Python beats numpy's per-call overhead
_PRIME = np.uint64(1_000_003)


def repeated_items(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, characters in them), first occurrences not counted."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


class NgramIndex:
    """Exact n-gram repeat structure of a word list, without building n-gram strings.

    Words are numbered by first appearance and an n-gram's key is a polynomial hash of its word
    numbers (uint64, wrapping), computed for all positions at once with numpy. Every occurrence
    of a repeated n-gram starts an occurrence of a repeated (n-1)-gram, so the repeats for n
    are found among the repeats for n - 1: only the first, smallest n needs a full pass.
    """

    def __init__(self, words: list[str]) -> None:
        number = {w: i for i, w in enumerate(dict.fromkeys(words))}
        self.ids = np.fromiter(map(number.__getitem__, words), dtype=np.uint64, count=len(words))
        self.cum = np.concatenate(([0], np.cumsum(np.fromiter(map(len, words), dtype=np.int64,
                                                              count=len(words)))))
        self._repeats: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def count(self, n: int) -> int:
        """Number of n-gram positions."""
        return max(len(self.ids) - n + 1, 0)

    def hashes(self, n: int, positions: np.ndarray) -> np.ndarray:
        h = np.zeros(len(positions), dtype=np.uint64)
        for k in range(n):
            h = h * _PRIME + self.ids[positions + k]
        return h

    def chars(self, n: int, positions: np.ndarray | int) -> np.ndarray:
        """Characters of the words of the n-grams at ``positions`` (separators not counted)."""
        return self.cum[np.add(positions, n)] - self.cum[positions]

    def repeats(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(positions, first occurrence, key, count) of every occurrence of an n-gram seen twice or more."""
        if n not in self._repeats:
            count = self.count(n)
            if n - 1 in self._repeats:
                cand = self._repeats[n - 1][0]
                cand = cand[cand < count]
                if len(cand) == 0:
                    self._repeats[n] = self._repeats[n - 1]
                    return self._repeats[n]
            else:
                cand = np.arange(count)
            _, first_idx, inverse, counts = np.unique(self.hashes(n, cand), return_index=True,
                                                      return_inverse=True, return_counts=True)
            keep = counts[inverse] > 1
            self._repeats[n] = (cand[keep], cand[first_idx[inverse]][keep], inverse[keep],
                                counts[inverse][keep])
        return self._repeats[n]


class PlainNgrams:
    """The same counts as :class:`NgramIndex` with tuples and a Counter (faster on short documents)."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.unique_from: int | None = None

    def grams(self, n: int) -> list[tuple[str, ...]]:
        return list(zip(*(self.words[i:] for i in range(n))))

    def top(self, n: int) -> int:
        grams = self.grams(n)
        if not grams:
            return 0
        gram, count = Counter(grams).most_common(1)[0]
        return (sum(map(len, gram)) + n - 1) * count

    def duplicated(self, n: int) -> int:
        if self.unique_from is not None and n >= self.unique_from:
            return 0
        grams = self.grams(n)
        if len(set(grams)) == len(grams):
            self.unique_from = n  # no repeated n-gram: no repeated longer one either
            return 0
        seen: set[tuple[str, ...]] = set()
        repeated = idx = 0
        while idx < len(grams):
            if grams[idx] in seen:
                repeated += sum(map(len, grams[idx]))
                idx += n
            else:
                seen.add(grams[idx])
                idx += 1
        return repeated


def top_ngram_chars(index: NgramIndex, n: int) -> int:
    """Characters of the most frequent n-gram (joined with spaces) times its count.

    Ties go to the n-gram that appears first, as ``Counter.most_common`` does.
    """
    if index.count(n) == 0:
        return 0
    pos, first, _, counts = index.repeats(n)
    if len(pos) == 0:
        return int(index.chars(n, 0)) + n - 1
    top = int(counts.max())
    at = int(first[counts == top].min())
    return (int(index.chars(n, at)) + n - 1) * top


def duplicated_ngram_chars(index: NgramIndex, n: int) -> int:
    """Characters in n-grams that repeat an earlier one; after a repeat the next n-1 positions are skipped.

    Equivalent to walking every position with a set of seen n-grams, but the walk only visits
    positions whose n-gram occurred before (usually few): every other position is a first
    occurrence and would simply be added to the set.
    """
    if index.count(n) == 0:
        return 0
    pos, first, key, _ = index.repeats(n)
    later = first < pos
    if not later.any():
        return 0
    pos, first, key = pos[later].tolist(), first[later].tolist(), key[later].tolist()
    chars = index.chars(n, np.array(pos)).tolist()
    skipped_until = -1  # positions up to here were skipped by the last repeat
    skipped: set[int] = set()
    seen_late: set[int] = set()  # n-grams first added at a repeat whose first occurrence was skipped
    repeated = 0
    for p, f, k, c in zip(pos, first, key, chars):
        if p <= skipped_until:
            continue
        if f not in skipped or k in seen_late:
            repeated += c
            skipped.update(range(p + 1, p + n))
            skipped_until = p + n - 1
        else:
            seen_late.add(k)
    return repeated


def ngram_counters(words: list[str]) -> tuple[Callable[[int], int], Callable[[int], int]]:
    """``(top, duplicated)``: characters of the most frequent n-gram times its count, and
    characters in repeated n-grams, as functions of n (whichever implementation is faster for
    this many words; both give the same counts)."""
    if len(words) < NUMPY_MIN_WORDS:
        plain = PlainNgrams(words)
        return plain.top, plain.duplicated
    index = NgramIndex(words)
    return partial(top_ngram_chars, index), partial(duplicated_ngram_chars, index)
