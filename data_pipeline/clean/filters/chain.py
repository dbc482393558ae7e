"""The per-document cleaning chain: URL blocklist, language, Gopher, C4, FineWeb, PII.

Order follows FineWeb: cheap URL check first, then language id, Gopher repetition, Gopher
quality, C4 (which also removes lines), FineWeb, then PII redaction of what is kept.
``FILTERS`` is the one list that orders them; every drop has a reason code ``<filter>.<rule>``
and the report's funnel (``FUNNEL_STAGES``) follows the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_pipeline.clean.config import CleanConfig
from data_pipeline.clean.documents import Document
from data_pipeline.clean.filters.c4 import c4_filter
from data_pipeline.clean.filters.fineweb import fineweb_filter
from data_pipeline.clean.filters.gopher import gopher_quality, gopher_repetition
from data_pipeline.clean.filters.pii import redact_pii
from data_pipeline.clean.filters.text import split_words
from data_pipeline.clean.filters.urls import UrlBlocklist
from data_pipeline.clean.langid import detect_language, language_verdict


class Words:
    """The words of a document's text: split once, and again only after a filter changed the text."""

    def __init__(self) -> None:
        self._text: str | None = None
        self._words: list[str] = []

    def of(self, text: str) -> list[str]:
        if text is not self._text:
            self._text, self._words = text, split_words(text)
        return self._words


DocumentFilter = Callable[[Document, Words], str | None]
"""Checks (and may rewrite) one document; returns the drop reason or None."""


def _url(cfg: CleanConfig) -> DocumentFilter | None:
    if not cfg.urls.blocklist_file:
        return None
    blocklist = UrlBlocklist.from_file(cfg.urls.blocklist_file)
    return lambda doc, words: "url.blocklist" if blocklist.blocked(doc.url) else None


def _language(cfg: CleanConfig) -> DocumentFilter | None:
    if not cfg.langid.enabled:
        return None

    def language(doc: Document, words: Words) -> str | None:
        lang, score = detect_language(doc.text, cfg.langid)
        doc.language = lang
        doc.metadata["language_score"] = round(score, 4)
        return language_verdict(lang, score, cfg.langid)

    return language


def _on_words(rule: Callable[[str, list[str], Any], str | None], section: Any) -> DocumentFilter | None:
    """A rule ``(text, words, section) -> reason`` as a filter (None when its section is off)."""
    return (lambda doc, words: rule(doc.text, words.of(doc.text), section)) if section.enabled else None


def _c4(cfg: CleanConfig) -> DocumentFilter | None:
    if not cfg.c4.enabled:
        return None

    def c4(doc: Document, words: Words) -> str | None:
        text, reason = c4_filter(doc.text, cfg.c4)
        if reason:
            return reason
        if text != doc.text:
            doc.text = text
        return None

    return c4


def _pii(cfg: CleanConfig) -> DocumentFilter | None:
    if not cfg.pii.enabled:
        return None

    def pii(doc: Document, words: Words) -> None:
        doc.text, _ = redact_pii(doc.text, cfg.pii)

    return pii


@dataclass(frozen=True)
class FilterStep:
    name: str
    """Stage name: the prefix of its drop reasons and its row in the report's funnel."""
    build: Callable[[CleanConfig], DocumentFilter | None]
    """The filter for a config, or None when the config turns it off."""
    drops: bool = True
    """False for a step that only rewrites text (PII redaction)."""


FILTERS = (
    FilterStep("url", _url),
    FilterStep("language", _language),
    FilterStep("gopher_repetition", lambda cfg: _on_words(gopher_repetition, cfg.gopher_repetition)),
    FilterStep("gopher_quality", lambda cfg: _on_words(gopher_quality, cfg.gopher_quality)),
    FilterStep("c4", _c4),
    FilterStep("fineweb", lambda cfg: _on_words(fineweb_filter, cfg.fineweb)),
    FilterStep("pii", _pii, drops=False),
)

FUNNEL_STAGES = ("error", "extract", "empty", *(step.name for step in FILTERS if step.drops), "dedup")


class FilterChain:
    """Applies the configured filters to one document in ``FILTERS`` order; returns the drop
    reason or None."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.filters = [f for f in (step.build(cfg) for step in FILTERS) if f is not None]

    def __call__(self, doc: Document) -> str | None:
        words = Words()
        for check in self.filters:
            reason = check(doc, words)
            if reason:
                return reason
        return None
