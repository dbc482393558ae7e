"""The per-document cleaning chain: URL blocklist, language, Gopher, C4, FineWeb, PII.

Order follows FineWeb: cheap URL check first, then language id, Gopher repetition, Gopher
quality, C4 (which also removes lines), FineWeb, then PII redaction of what is kept.
Every drop has a reason code ``<filter>.<rule>``; ``FUNNEL_STAGES`` is the report's order.
"""

from __future__ import annotations

from data_pipeline.config import CleanConfig
from data_pipeline.documents import Document
from data_pipeline.filters.c4 import c4_filter
from data_pipeline.filters.fineweb import fineweb_filter
from data_pipeline.filters.gopher import gopher_quality, gopher_repetition
from data_pipeline.filters.pii import redact_pii
from data_pipeline.filters.text import split_words
from data_pipeline.filters.urls import UrlBlocklist
from data_pipeline.langid import detect_language, language_verdict

FUNNEL_STAGES = ("error", "extract", "empty", "url", "language", "gopher_repetition",
                 "gopher_quality", "c4", "fineweb", "dedup")


class FilterChain:
    """Applies the configured filters to one document; returns the drop reason or None."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.blocklist = UrlBlocklist.from_file(cfg.urls.blocklist_file) if cfg.urls.blocklist_file else None
        self.pii_replacements = 0

    def __call__(self, doc: Document) -> str | None:
        cfg = self.cfg
        if self.blocklist is not None and self.blocklist.blocked(doc.url):
            return "url.blocklist"
        if cfg.langid.enabled:
            lang, score = detect_language(doc.text, cfg.langid)
            doc.language = lang
            doc.metadata["language_score"] = round(score, 4)
            reason = language_verdict(lang, score, cfg.langid)
            if reason:
                return reason
        words = split_words(doc.text) if (cfg.gopher_repetition.enabled or cfg.gopher_quality.enabled) else []
        if cfg.gopher_repetition.enabled:
            reason = gopher_repetition(doc.text, words, cfg.gopher_repetition)
            if reason:
                return reason
        if cfg.gopher_quality.enabled:
            reason = gopher_quality(doc.text, words, cfg.gopher_quality)
            if reason:
                return reason
        if cfg.c4.enabled:
            text, reason = c4_filter(doc.text, cfg.c4)
            if reason:
                return reason
            if text != doc.text:
                doc.text = text
                words = []
        if cfg.fineweb.enabled:
            reason = fineweb_filter(doc.text, words or split_words(doc.text), cfg.fineweb)
            if reason:
                return reason
        if cfg.pii.enabled:
            doc.text, n = redact_pii(doc.text, cfg.pii)
            self.pii_replacements += n
        return None
