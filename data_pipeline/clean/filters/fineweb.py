"""FineWeb's three custom filters (Penedo et al. 2024, "The FineWeb Datasets", section 3.3)."""

from __future__ import annotations

from data_pipeline.clean.config import FineWebConfig
from data_pipeline.clean.filters.repeats import repeated_items
from data_pipeline.clean.filters.text import TERMINAL_PUNCTUATION

_STOP_CHARS = tuple(TERMINAL_PUNCTUATION)


def fineweb_filter(text: str, words: list[str], cfg: FineWebConfig) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "fineweb.empty"
    ratio = sum(1 for line in lines if line.endswith(_STOP_CHARS)) / len(lines)
    if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return "fineweb.line_punct_ratio"
    ratio = sum(1 for line in lines if len(line) <= cfg.short_line_length) / len(lines)
    if ratio > cfg.short_line_thr:
        return "fineweb.short_line_ratio"
    chars = len(text) - text.count("\n")
    if chars and repeated_items(lines)[1] / chars > cfg.char_duplicates_ratio:
        return "fineweb.char_dup_ratio"
    if text.count("\n") / max(len(words), 1) > cfg.new_line_ratio:
        return "fineweb.list_ratio"
    return None
