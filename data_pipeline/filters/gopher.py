"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", Table A1).

Rules and their order follow the paper as implemented by datatrove, so the drop reasons and
decisions are comparable (``bench/clean.py``). Each function returns the drop reason or None.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import partial
from itertools import filterfalse

import numpy as np

from data_pipeline.config import GopherQualityConfig, GopherRepetitionConfig
from data_pipeline.filters.text import is_symbol_word

_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


def gopher_quality(text: str, words: list[str], cfg: GopherQualityConfig) -> str | None:
    n_words = len(words)
    alnum = list(filter(str.isalnum, words))  # the bulk, filtered at C speed
    content = alnum + [w for w in filterfalse(str.isalnum, words) if not is_symbol_word(w)]
    n_content = len(content)
    if n_words == 0 or (cfg.min_doc_words and n_content < cfg.min_doc_words):
        return "gopher_quality.short_doc"
    if cfg.max_doc_words and n_content > cfg.max_doc_words:
        return "gopher_quality.long_doc"
    if n_content:
        avg = sum(map(len, content)) / n_content
        if cfg.min_avg_word_length and avg < cfg.min_avg_word_length:
            return "gopher_quality.short_words"
        if cfg.max_avg_word_length and avg > cfg.max_avg_word_length:
            return "gopher_quality.long_words"
    if cfg.max_symbol_word_ratio:
        if text.count("#") / n_words > cfg.max_symbol_word_ratio:
            return "gopher_quality.too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
            return "gopher_quality.too_many_ellipsis"
    lines = text.splitlines() or [""]
    if cfg.max_bullet_lines_ratio:
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return "gopher_quality.too_many_bullet_lines"
    if cfg.max_ellipsis_lines_ratio:
        ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ellipsis / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "gopher_quality.too_many_ellipsis_lines"
    if cfg.min_alpha_words_ratio:
        alpha = sum(map(str.isalpha, words)) + sum(
            1 for w in filterfalse(str.isalpha, words) if any(map(str.isalpha, w)))
        if alpha / n_words < cfg.min_alpha_words_ratio:
            return "gopher_quality.few_alpha_words"
    if cfg.min_stop_words and len(set(cfg.stop_words).intersection(words)) < cfg.min_stop_words:
        return "gopher_quality.few_stop_words"
    return None


def _duplicates(items: list[str]) -> tuple[int, int]:
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


class _NgramIndex:
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


_PRIME = np.uint64(1_000_003)
_NUMPY_MIN_WORDS = 400  # below this many words plain Python beats numpy's per-call overhead


class _PlainNgrams:
    """The same counts as :class:`_NgramIndex` with tuples and a Counter (faster on short documents)."""

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


def _top_ngram_chars(index: _NgramIndex, n: int) -> int:
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


def _duplicated_ngram_chars(index: _NgramIndex, n: int) -> int:
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


def gopher_repetition(text: str, words: list[str], cfg: GopherRepetitionConfig) -> str | None:
    if not text:
        return "gopher_repetition.empty"
    paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
    dup, chars = _duplicates(paragraphs)
    if cfg.dup_para_frac and dup / len(paragraphs) > cfg.dup_para_frac:
        return "gopher_repetition.dup_para_frac"
    if cfg.dup_para_char_frac and chars / len(text) > cfg.dup_para_char_frac:
        return "gopher_repetition.dup_para_char_frac"
    lines = _LINE_SPLIT.split(text)
    dup, chars = _duplicates(lines)
    if cfg.dup_line_frac and dup / len(lines) > cfg.dup_line_frac:
        return "gopher_repetition.dup_line_frac"
    if cfg.dup_line_char_frac and chars / len(text) > cfg.dup_line_char_frac:
        return "gopher_repetition.dup_line_char_frac"
    if len(words) < _NUMPY_MIN_WORDS:
        plain = _PlainNgrams(words)
        top, duplicated = plain.top, plain.duplicated
    else:
        index = _NgramIndex(words)
        top, duplicated = partial(_top_ngram_chars, index), partial(_duplicated_ngram_chars, index)
    for n, frac in sorted(cfg.top_n_grams.items()):
        if frac and top(n) / len(text) > frac:
            return f"gopher_repetition.top_{n}_gram"
    for n, frac in sorted(cfg.dup_n_grams.items()):
        if frac and duplicated(n) / len(text) > frac:
            return f"gopher_repetition.dup_{n}_gram"
    return None
