"""HTML -> main text with a maintained extractor, under per-document size and time limits.

resiliparse is the default: on the bundled real crawl pages it extracts comparable main text
to trafilatura at a fraction of the time (``bench/clean.py --extract`` measures both). Limits:
payloads over ``max_html_bytes`` are not parsed at all, and extraction runs under a
``SIGALRM`` timer in the worker's main thread, so a pathological page costs at most
``timeout_s`` (Python-level extractors are interrupted; resiliparse is linear-time C++ and is
protected by the size limit).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from data_pipeline.clean.config import ExtractConfig
from data_pipeline.clean.readers.streams import decode_text


class ExtractTimeout(Exception):
    pass


class ExtractTooLarge(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ExtractTimeout` in the block after ``seconds`` (main thread only; no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise ExtractTimeout(f"extraction took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _resiliparse(html: str, main_content: bool) -> str:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    return extract_plain_text(tree, main_content=main_content, alt_texts=False, links=False,
                              list_bullets=True, noscript=False)


def _trafilatura(html: str, main_content: bool) -> str:
    import trafilatura

    text = trafilatura.extract(html, include_comments=False, include_tables=True,
                               no_fallback=not main_content, favor_precision=main_content,
                               deduplicate=False)
    return text or ""


EXTRACTORS = {"resiliparse": _resiliparse, "trafilatura": _trafilatura}


def extract_html(html: bytes, cfg: ExtractConfig, fallbacks: dict[str, int] | None = None) -> str:
    """Main text of an HTML page; raises ExtractTooLarge / ExtractTimeout past the limits."""
    if len(html) > cfg.max_html_bytes:
        raise ExtractTooLarge(f"HTML is {len(html)} bytes (> data.extract.max_html_bytes={cfg.max_html_bytes})")
    text = decode_text(html, fallbacks)
    with time_limit(cfg.timeout_s):
        return EXTRACTORS[cfg.extractor](text, cfg.main_content)
