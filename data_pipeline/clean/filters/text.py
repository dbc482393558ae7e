"""Word and sentence splitting shared by the quality filters.

The published filter implementations (datatrove's Gopher, C4 and FineWeb filters) count words
and sentences with spaCy's English tokenizer and sentencizer, and running spaCy is most of
their cost. This module applies the same tokenizer *rules* (spaCy's exported prefix, suffix,
infix and URL patterns and its special-case table, in :mod:`spacy_en_rules`) with the same
affix-splitting algorithm, in plain Python with a per-chunk cache: whitespace-separated chunks
that are purely alphanumeric (most of them) need no work at all. ``bench/clean.py`` measures
how often each rule's decision agrees with datatrove's.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from itertools import chain

from data_pipeline.clean.filters import spacy_en_rules as _rules

# Every alternative of spaCy's prefix pattern is anchored with ^; without the anchors the
# pattern can be matched at any index with ``match(s, pos)``.
_PREFIX_AT = re.compile(_rules.PREFIX.replace("|^", "|").removeprefix("^"))
_ALNUM_PREFIX_STARTS = frozenset("UCA")  # US$, C$, A$: the only prefixes starting with a letter
_DIGIT_OR_APOSTROPHE = re.compile(r"[0-9'’]").search
_MAX_SPECIAL = max(map(len, _rules.EXCEPTIONS))
_SUFFIX_RE = re.compile(_rules.SUFFIX)
_SUFFIX_WINDOW = 24
_INFIX = re.compile(_rules.INFIX).finditer
_URL = re.compile(_rules.URL).match
_MAX_URL = 2048
_SPECIAL = _rules.EXCEPTIONS
# Special cases that hold punctuation can span several affix pieces (")" + ":" -> "):");
# spaCy merges those pieces back after splitting, and so does _merge_specials.
_SPECIAL_SPANS = {k for k in _SPECIAL if not k.isalnum() and not k.isspace()}
_MAX_SPAN = 6


def _is_special(s: str, a: int, b: int) -> bool:
    return 0 < b - a <= _MAX_SPECIAL and s[a:b] in _SPECIAL


def _prefix_len(s: str, a: int, b: int) -> int:
    if s[a].isalnum() and s[a] not in _ALNUM_PREFIX_STARTS:
        return 0
    m = _PREFIX_AT.match(s, a, b)
    return m.end() - a if m else 0


def _suffix_len(s: str, a: int, b: int) -> int:
    """Length of spaCy's suffix of ``s[a:b]`` (searching only near the end: all rules end in $).

    Suffixes that end in a letter or digit are units/currencies after a digit and 's/'S, so a
    piece ending in one without any digit or apostrophe has no suffix.
    """
    if a >= b:
        return 0
    start = max(b - _SUFFIX_WINDOW, a)
    if s[b - 1].isalnum() and not _DIGIT_OR_APOSTROPHE(s, start, b):
        return 0
    m = _SUFFIX_RE.search(s, start, b)
    if m is not None and start > a and m.start() == start:
        m = _SUFFIX_RE.search(s, a, b)  # a suffix longer than the window (e.g. a long run of dots)
    return m.end() - m.start() if m else 0


def _split_affixes(chunk: str) -> tuple[list[str], str, list[str]]:
    """spaCy's ``Tokenizer._split_affixes``: peel prefixes and suffixes off a chunk.

    Works on indices into the chunk (no re-slicing per step), so a long run of punctuation
    costs linear, not quadratic, time.
    """
    prefixes: list[str] = []
    suffixes: list[str] = []
    a, b = 0, len(chunk)
    last = -1
    while a < b and b - a != last:
        if _is_special(chunk, a, b):
            break
        last = b - a
        pre = _prefix_len(chunk, a, b)
        if pre and _is_special(chunk, a + pre, b):
            prefixes.append(chunk[a:a + pre])
            a += pre
            break
        suf = _suffix_len(chunk, a + pre, b)
        if suf and _is_special(chunk, a, b - suf):
            suffixes.append(chunk[b - suf:b])
            b -= suf
            break
        if pre and suf and pre + suf <= b - a:
            prefixes.append(chunk[a:a + pre])
            suffixes.append(chunk[b - suf:b])
            a, b = a + pre, b - suf
        elif pre:
            prefixes.append(chunk[a:a + pre])
            a += pre
        elif suf:
            suffixes.append(chunk[b - suf:b])
            b -= suf
        if _is_special(chunk, a, b):
            break
    return prefixes, chunk[a:b], suffixes


def _expand(piece: str, out: list[str]) -> None:
    special = _SPECIAL.get(piece)
    if special is None:
        out.append(piece)
    else:
        out.extend(special)


@lru_cache(maxsize=1 << 17)
def _split_chunk(chunk: str) -> tuple[str, ...]:
    """spaCy's tokenisation of one whitespace-free chunk (``_split_affixes`` + ``_attach_tokens``)."""
    if chunk in _SPECIAL:
        return _SPECIAL[chunk]
    if chunk.isalpha():
        return (chunk,)
    simple = _simple_affixes(chunk)
    if simple is not None:
        return simple
    prefixes, core, suffixes = _split_affixes(chunk)
    out: list[str] = []
    for p in prefixes:
        _expand(p, out)
    if core:
        if core in _SPECIAL:
            out.extend(_SPECIAL[core])
        elif len(core) <= _MAX_URL and "." in core and _URL(core):  # hosts need a dot; the pattern backtracks on giant chunks
            out.append(core)
        else:
            start = 0
            for m in _INFIX(core):
                if m.start() == 0:
                    continue
                if m.start() != start:
                    out.append(core[start:m.start()])
                if m.start() != m.end():
                    out.append(core[m.start():m.end()])
                start = m.end()
            if core[start:]:
                out.append(core[start:])
    for s in reversed(suffixes):
        _expand(s, out)
    if len(out) > 1 and not _SPAN_FIRST.isdisjoint(out):
        return tuple(_merge_specials(out))
    return tuple(out)


# Punctuation that spaCy splits off as a suffix/prefix unconditionally (no lookbehind rule).
_PLAIN_SUFFIX = frozenset(',;:!?)]}"\'')
_PLAIN_PREFIX = frozenset('(["\'')


def _simple_affixes(chunk: str) -> tuple[str, ...] | None:
    """Fast path for the commonest shapes, "word," "word." "(word": same result as the full rules."""
    last, first = chunk[-1], chunk[0]
    if len(chunk) > 1 and (last in _PLAIN_SUFFIX or (last == "." and "a" <= chunk[-2] <= "z")):
        core = chunk[:-1]
        if core.isalpha() and core not in _SPECIAL:
            return (core, last)
    if len(chunk) > 1 and first in _PLAIN_PREFIX:
        core = chunk[1:]
        if core.isalpha() and core not in _SPECIAL:
            return (first, core)
    return None


def _merge_specials(tokens: list[str]) -> list[str]:
    """Re-join adjacent pieces that together spell a special case (longest match, left to right)."""
    out: list[str] = []
    i = 0
    n = len(tokens)
    while i < n:
        for j in range(min(n, i + _MAX_SPAN), i + 1, -1):
            joined = "".join(tokens[i:j])
            if joined in _SPECIAL_SPANS:
                out.extend(_SPECIAL[joined])
                i = j
                break
        else:
            out.append(tokens[i])
            i += 1
    return out


def _span_first_pieces() -> frozenset[str]:
    """First piece of every multi-piece special case: a merge can only start at one of them."""
    firsts = set()
    for key in _SPECIAL_SPANS:
        pre, core, suf = _split_affixes(key)
        pieces = pre + ([core] if core else []) + suf[::-1]
        if len(pieces) > 1:
            firsts.add(pieces[0])
        firsts.update(p for p in (pre + suf) if len(p) > 1)
    firsts.update(k[:i] for k in _SPECIAL_SPANS for i in range(1, len(k)))
    return frozenset(firsts)


def split_words(text: str) -> list[str]:
    """Words and punctuation tokens of ``text``, as spaCy's English tokenizer gives them."""
    return list(chain.from_iterable(map(_split_chunk, text.split())))


# Gopher's "symbol words": tokens made only of these characters (datatrove's PUNCTUATION set
# and sentence terminals, Apache-2.0, plus the C0/C1 control characters it includes).
_SYMBOL_CHARS = frozenset(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))
)


@lru_cache(maxsize=1 << 16)
def is_symbol_word(token: str) -> bool:
    """True for tokens made only of punctuation/symbols (not counted as words by Gopher's rules)."""
    return all(ch in _SYMBOL_CHARS or ch in TERMINAL_PUNCTUATION for ch in token)


@lru_cache(maxsize=1 << 16)
def is_punct_token(token: str) -> bool:
    """spaCy's ``is_punct``: every character is Unicode punctuation (category P*)."""
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def count_sentences(tokens: list[str]) -> int:
    """Sentences of a tokenised line, by the rule of spaCy's sentencizer.

    A new sentence starts at the first non-punctuation token after a token that is a
    sentence-final character on its own (``.``, ``!``, ``?``, ...).
    """
    if not tokens:
        return 0
    sentences = 1
    seen_end = False
    for tok in tokens:
        if tok in SENTENCE_END:
            seen_end = True
        elif seen_end and not is_punct_token(tok):
            sentences += 1
            seen_end = False
    return sentences


# Characters that end a sentence for spaCy's sentencizer (its default punct_chars).
SENTENCE_END = frozenset("!.?\u0589\u061f\u06d4\u0700\u0701\u0702\u07f9\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U0001bc9f\U0001da88")
# Unicode Sentence_Terminal characters (what "ends in terminal punctuation" means for FineWeb).
TERMINAL_PUNCTUATION = frozenset("!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b4e\u1b4f\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1b7f\u1c3b\u1c3c\u1c7e\u1c7f\u2024\u203c\u203d\u2047\u2048\u2049\u2cf9\u2cfa\u2cfb\u2e2e\u2e3c\u2e53\u2e54\u2e60\u2e61\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U000113d4\U000113d5\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016d6e\U00016d6f\U00016e98\U0001bc9f\U0001da88")


_SPAN_FIRST = _span_first_pieces()
