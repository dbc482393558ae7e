"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", Table A1).

Rules and their order follow the paper as implemented by datatrove, so the drop reasons and
decisions are comparable (``bench/clean.py``). Each function returns the drop reason or None.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipeline.config import GopherQualityConfig, GopherRepetitionConfig
from data_pipeline.filters.text import is_punct_token

_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


def gopher_quality(text: str, words: list[str], cfg: GopherQualityConfig) -> str | None:
    n_words = len(words)
    content = [w for w in words if w.isalnum() or not is_punct_token(w)]
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
        alpha = sum(1 for w in words if w.isalpha() or any(map(str.isalpha, w)))
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
    """Integer n-gram hashes of a word list, for exact counting without building n-gram strings.

    Words are numbered by first appearance; an n-gram's key is a polynomial hash of its word
    numbers (uint64, wrapping), computed for all positions at once with numpy.
    """

    def __init__(self, words: list[str]) -> None:
        ids: dict[str, int] = {}
        self.ids = np.fromiter((ids.setdefault(w, len(ids)) for w in words), dtype=np.uint64, count=len(words))
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.cum = np.concatenate(([0], np.cumsum(self.lengths)))
        self._hashes: dict[int, np.ndarray] = {}

    def hashes(self, n: int) -> np.ndarray:
        if n not in self._hashes:
            count = max(len(self.ids) - n + 1, 0)
            h = np.zeros(count, dtype=np.uint64)
            for k in range(n if count else 0):
                h = h * _PRIME + self.ids[k:k + count]
            self._hashes[n] = h
        return self._hashes[n]

    def chars(self, n: int) -> np.ndarray:
        """Characters of the words of each n-gram (separators not counted)."""
        count = len(self.ids) - n + 1
        return self.cum[n:n + count] - self.cum[:count]


_PRIME = np.uint64(1_000_003)


def _top_ngram_chars(index: _NgramIndex, n: int) -> int:
    """Characters of the most frequent n-gram (joined with spaces) times its count.

    Ties go to the n-gram that appears first, as ``Counter.most_common`` does.
    """
    h = index.hashes(n)
    if len(h) == 0:
        return 0
    _, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = counts.max()
    pos = int(first[counts == top].min())
    return int(index.chars(n)[pos] + n - 1) * int(top)


def _duplicated_ngram_chars(index: _NgramIndex, n: int) -> int:
    """Characters in n-grams that repeat an earlier one; after a repeat the next n-1 positions are skipped.

    Equivalent to walking every position with a set of seen n-grams, but the walk only visits
    positions whose n-gram occurred before (usually few): every other position is a first
    occurrence and would simply be added to the set.
    """
    h = index.hashes(n)
    if len(h) == 0:
        return 0
    _, first_at, inverse = np.unique(h, return_index=True, return_inverse=True)
    first = first_at[inverse]
    repeats = np.flatnonzero(first < np.arange(len(h)))
    if len(repeats) == 0:
        return 0
    chars = index.chars(n)
    skipped = np.zeros(len(h), dtype=bool)
    seen_late: set[int] = set()  # n-grams first added at a repeat whose first occurrence was skipped
    repeated = 0
    next_pos = 0
    for pos in repeats.tolist():
        if pos < next_pos:
            continue  # skipped over by an earlier repeat
        key = int(inverse[pos])
        if not skipped[first[pos]] or key in seen_late:
            repeated += int(chars[pos])
            skipped[pos + 1:pos + n] = True
            next_pos = pos + n
        else:
            seen_late.add(key)
            next_pos = pos + 1
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
    index = _NgramIndex(words)
    for n, frac in sorted(cfg.top_n_grams.items()):
        if frac and _top_ngram_chars(index, n) / len(text) > frac:
            return f"gopher_repetition.top_{n}_gram"
    for n, frac in sorted(cfg.dup_n_grams.items()):
        if frac and _duplicated_ngram_chars(index, n) / len(text) > frac:
            return f"gopher_repetition.dup_{n}_gram"
    return None
