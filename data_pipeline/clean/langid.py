"""Offline language identification with py3langid (its model ships inside the pip package)."""

from __future__ import annotations

from functools import lru_cache

from data_pipeline.clean.config import LangIdConfig


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str, cfg: LangIdConfig) -> tuple[str, float]:
    """(ISO 639-1 code, normalised probability) of the first ``cfg.max_chars`` characters."""
    lang, score = _identifier().classify(text[: cfg.max_chars])
    return str(lang), float(score)


def language_verdict(lang: str, score: float, cfg: LangIdConfig) -> str | None:
    """Drop reason for a detected language, or None when the document passes."""
    if cfg.languages and lang not in cfg.languages:
        return "language.not_allowed"
    if score < cfg.min_score:
        return "language.low_score"
    return None
