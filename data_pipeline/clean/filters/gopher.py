"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", Table A1).

Rules and their order follow the paper as implemented by datatrove, so the drop reasons and
decisions are comparable (``bench/clean.py``). Each function returns the drop reason or None.
"""

from __future__ import annotations

import re
from itertools import filterfalse

from data_pipeline.clean.config import GopherQualityConfig, GopherRepetitionConfig
from data_pipeline.clean.filters.repeats import ngram_counters, repeated_items
from data_pipeline.clean.filters.text import is_symbol_word

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


def gopher_repetition(text: str, words: list[str], cfg: GopherRepetitionConfig) -> str | None:
    if not text:
        return "gopher_repetition.empty"
    paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
    dup, chars = repeated_items(paragraphs)
    if cfg.dup_para_frac and dup / len(paragraphs) > cfg.dup_para_frac:
        return "gopher_repetition.dup_para_frac"
    if cfg.dup_para_char_frac and chars / len(text) > cfg.dup_para_char_frac:
        return "gopher_repetition.dup_para_char_frac"
    lines = _LINE_SPLIT.split(text)
    dup, chars = repeated_items(lines)
    if cfg.dup_line_frac and dup / len(lines) > cfg.dup_line_frac:
        return "gopher_repetition.dup_line_frac"
    if cfg.dup_line_char_frac and chars / len(text) > cfg.dup_line_char_frac:
        return "gopher_repetition.dup_line_char_frac"
    top, duplicated = ngram_counters(words)
    for n, frac in sorted(cfg.top_n_grams.items()):
        if frac and top(n) / len(text) > frac:
            return f"gopher_repetition.top_{n}_gram"
    for n, frac in sorted(cfg.dup_n_grams.items()):
        if frac and duplicated(n) / len(text) > frac:
            return f"gopher_repetition.dup_{n}_gram"
    return None
