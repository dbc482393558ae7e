"""C4 rules (Raffel et al. 2020, section 2.2; reference: tensorflow_datasets c4_utils).

Line-level removals (no terminal punctuation, too few words, overlong words, javascript,
cookie/policy boilerplate, citation marks) rewrite the document; document-level rules (lorem
ipsum, curly bracket, fewer than 5 sentences left) drop it.
"""

from __future__ import annotations

import re

from data_pipeline.clean.config import C4Config
from data_pipeline.clean.filters.text import count_sentences, split_words

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")


def c4_filter(text: str, cfg: C4Config) -> tuple[str, str | None]:
    """(text with C4's line removals applied, drop reason or None)."""
    kept: list[str] = []
    sentences = 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if cfg.max_word_length and len(line) > cfg.max_word_length and any(
                len(w) > cfg.max_word_length for w in words):
            continue
        if cfg.remove_citations:
            line = CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        lower = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
            return text, "c4.lorem_ipsum"
        if cfg.filter_javascript and "javascript" in lower:
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return text, "c4.curly_bracket"
        if cfg.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
            continue
        if cfg.min_num_sentences and sentences < cfg.min_num_sentences:
            sentences += count_sentences(split_words(line))
        kept.append(line)
    if cfg.min_num_sentences and sentences < cfg.min_num_sentences:
        return text, "c4.too_few_sentences"
    return "\n".join(kept).strip(), None
