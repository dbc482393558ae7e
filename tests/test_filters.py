"""One test per filter rule and reason: tiny documents on both sides of each threshold."""

from __future__ import annotations

import pytest

from data_pipeline.clean.config import (
    C4Config,
    CleanConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LangIdConfig,
    NormalizeConfig,
    PiiConfig,
    UrlFilterConfig,
)
from data_pipeline.clean.documents import Document
from data_pipeline.clean.filters.c4 import c4_filter
from data_pipeline.clean.filters.chain import FilterChain
from data_pipeline.clean.filters.fineweb import fineweb_filter
from data_pipeline.clean.filters.gopher import gopher_quality, gopher_repetition
from data_pipeline.clean.filters.pii import redact_pii
from data_pipeline.clean.filters.text import count_sentences, split_words
from data_pipeline.clean.filters.urls import UrlBlocklist
from data_pipeline.clean.langid import detect_language, language_verdict
from data_pipeline.clean.normalize import normalize_text

QUALITY_OFF = dict(min_doc_words=0, max_doc_words=0, min_avg_word_length=0, max_avg_word_length=0,
                   max_symbol_word_ratio=0, max_bullet_lines_ratio=0, max_ellipsis_lines_ratio=0,
                   min_alpha_words_ratio=0, min_stop_words=0)
REPETITION_OFF = dict(dup_line_frac=0, dup_para_frac=0, dup_line_char_frac=0, dup_para_char_frac=0,
                      top_n_grams={}, dup_n_grams={})


def words(n: int, length: int = 5) -> str:
    """n distinct alphabetic words of ``length`` letters."""
    out = []
    for i in range(n):
        w = ""
        j = i
        for _ in range(length):
            w += "abcdefghijklmnopqrstuvwxyz"[j % 26]
            j //= 26
        out.append(w)
    return " ".join(out)


def quality(text: str, **rule) -> str | None:
    return gopher_quality(text, split_words(text), GopherQualityConfig(**{**QUALITY_OFF, **rule}))


def repetition(text: str, **rule) -> str | None:
    return gopher_repetition(text, split_words(text), GopherRepetitionConfig(**{**REPETITION_OFF, **rule}))


# ------------------------------------------------------------------ Gopher quality

@pytest.mark.parametrize("rule,passing,dropped,reason", [
    ({"min_doc_words": 50}, words(50), words(49), "short_doc"),
    ({"max_doc_words": 10}, words(10), words(11), "long_doc"),
    ({"min_avg_word_length": 3}, words(10, 3), words(10, 2), "short_words"),
    ({"max_avg_word_length": 10}, words(10, 10), words(10, 11), "long_words"),
    ({"max_symbol_word_ratio": 0.1}, words(10) + " #", words(10) + " # #", "too_many_hashes"),
    ({"max_symbol_word_ratio": 0.1}, words(10) + " …", words(10) + " … …", "too_many_ellipsis"),
    ({"max_bullet_lines_ratio": 0.9}, "\n".join(["- item"] * 9 + ["plain"]), "\n".join(["• item"] * 10),
     "too_many_bullet_lines"),
    ({"max_ellipsis_lines_ratio": 0.3}, "\n".join(["and so..."] * 3 + ["done"] * 7),
     "\n".join(["and so…"] * 4 + ["done"] * 6), "too_many_ellipsis_lines"),
    ({"min_alpha_words_ratio": 0.8}, words(8) + " 12 34", words(7) + " 12 34 56", "few_alpha_words"),
    ({"min_stop_words": 2}, "the cat and dog", "the cat or dog", "few_stop_words"),
])
def test_gopher_quality_rules(rule, passing, dropped, reason):
    assert quality(passing, **rule) is None
    assert quality(dropped, **rule) == f"gopher_quality.{reason}"


def test_gopher_quality_defaults_keep_real_prose(sample_dir):
    text = (sample_dir / "news/lee_abc/lee_background.cor").read_text().splitlines()[0]
    assert gopher_quality(text, split_words(text), GopherQualityConfig()) is None


def test_punctuation_counts_as_words_for_the_alpha_ratio():
    # as in datatrove: spaCy tokens include punctuation, so "a, b, c" is 5 words, 3 alphabetic
    assert split_words("Hello, world. It's U.S. e.g. well-known 3.5% don't") == [
        "Hello", ",", "world", ".", "It", "'s", "U.S.", "e.g.", "well", "-", "known", "3.5", "%", "do", "n't"]


# ------------------------------------------------------------------ Gopher repetition

@pytest.mark.parametrize("rule,passing,dropped,reason", [
    ({"dup_para_frac": 0.3}, "\n\n".join(["same"] * 4 + [words(6).split()[i] for i in range(6)]),
     "\n\n".join(["same"] * 5 + [words(5).split()[i] for i in range(5)]), "dup_para_frac"),
    ({"dup_line_frac": 0.3}, "\n".join(["same"] * 4 + words(6).split()),
     "\n".join(["same"] * 5 + words(5).split()), "dup_line_frac"),
])
def test_gopher_repetition_fraction_rules(rule, passing, dropped, reason):
    assert repetition(passing, **rule) is None
    assert repetition(dropped, **rule) == f"gopher_repetition.{reason}"


@pytest.mark.parametrize("rule,value,text,reason", [
    # the repeated paragraph / line "aaaa bbbb" holds 9 characters of the text
    ("dup_para_char_frac", 9 / 30, "aaaa bbbb\n\naaaa bbbb\n\ncc dd ee", "dup_para_char_frac"),
    ("dup_line_char_frac", 9 / 28, "aaaa bbbb\naaaa bbbb\ncc dd ee", "dup_line_char_frac"),
])
def test_gopher_repetition_char_rules(rule, value, text, reason):
    assert value == 9 / len(text)
    assert repetition(text, **{rule: value + 0.01}) is None
    assert repetition(text, **{rule: value - 0.01}) == f"gopher_repetition.{reason}"


def test_gopher_top_and_duplicated_ngrams():
    text = "ab cd ab cd ef gh ij kl"  # top 2-gram "ab cd": 5 chars x 2 of 23
    assert repetition(text, top_n_grams={2: 10 / 23 + 0.01}) is None
    assert repetition(text, top_n_grams={2: 10 / 23 - 0.01}) == "gopher_repetition.top_2_gram"
    text = "a b c d e a b c d e f"  # the second "a b c d e" repeats: 5 chars of 21
    assert repetition(text, dup_n_grams={5: 5 / 21 + 0.01}) is None
    assert repetition(text, dup_n_grams={5: 5 / 21 - 0.01}) == "gopher_repetition.dup_5_gram"


# ------------------------------------------------------------------ C4

SENT = "This line is a full sentence."


def test_c4_line_removals_rewrite_the_document():
    cfg = C4Config(min_num_sentences=0)
    lines = [SENT, "No terminal punctuation here", "Ends with an ellipsis...", "Two words.",
             "Please enable JavaScript to see this.", "This site uses cookies for sure.",
             "A word " + "x" * 1001 + " here.", "Cited claim here.[1]", "Cited claim there[citation needed]"]
    text, reason = c4_filter("\n".join(lines), cfg)
    assert reason is None
    assert text.split("\n") == [SENT, "Cited claim here."]


@pytest.mark.parametrize("passing,dropped,reason", [
    (" ".join([SENT] * 5), " ".join([SENT] * 4), "too_few_sentences"),
    ("\n".join([SENT] * 5), "\n".join([SENT] * 4 + ["Lorem ipsum dolor sit amet."]), "lorem_ipsum"),
    ("\n".join([SENT] * 5), "\n".join([SENT] * 5 + ["We use {braces} in code."]), "curly_bracket"),
])
def test_c4_document_rules(passing, dropped, reason):
    assert c4_filter(passing, C4Config())[1] is None
    assert c4_filter(dropped, C4Config())[1] == f"c4.{reason}"


def test_sentence_counting_follows_the_sentencizer():
    assert count_sentences(split_words("One. Two! Three? Four.")) == 4
    assert count_sentences(split_words("Mr. Smith went to the U.S. today.")) == 1
    assert count_sentences(split_words('He said "stop." Then left.')) == 2


# ------------------------------------------------------------------ FineWeb

FW_OFF = dict(line_punct_thr=0, short_line_thr=1.0, char_duplicates_ratio=1.0, new_line_ratio=1e9)
LONG = "this is a fairly long line of text without an end"  # > 30 chars


def fineweb(text: str, **rule) -> str | None:
    return fineweb_filter(text, split_words(text), FineWebConfig(**{**FW_OFF, **rule}))


@pytest.mark.parametrize("rule,passing,dropped,reason", [
    ({"line_punct_thr": 0.12}, "\n".join([LONG + "."] + [LONG + str(i) for i in range(7)]),
     "\n".join([LONG + "."] + [LONG + str(i) for i in range(8)]), "line_punct_ratio"),
    ({"short_line_thr": 0.67}, "\n".join(["short a", "short b", LONG]),
     "\n".join(["short a", "short b", "short c", LONG]), "short_line_ratio"),
    ({"new_line_ratio": 0.3}, "\n".join(["one two three four"] * 2 + ["end here now"]),
     "\n".join(["one two"] * 3), "list_ratio"),
])
def test_fineweb_rules(rule, passing, dropped, reason):
    assert fineweb(passing, **rule) is None
    assert fineweb(dropped, **rule) == f"fineweb.{reason}"


def test_fineweb_char_duplicates():
    text = "\n".join([LONG + "a", LONG + "a", LONG + "b"])  # 51 of 153 chars duplicated
    assert fineweb(text, char_duplicates_ratio=51 / 153 + 0.01) is None
    assert fineweb(text, char_duplicates_ratio=51 / 153 - 0.01) == "fineweb.char_dup_ratio"


# ------------------------------------------------------------------ URLs, language, PII, normalisation

def test_url_blocklist(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("# comment\nbad.com\nhttp://ok.org/one/page\n")
    bl = UrlBlocklist.from_file(str(f))
    assert bl.blocked("https://bad.com/x") and bl.blocked("http://sub.bad.com")
    assert not bl.blocked("https://notbad.com/") and not bl.blocked(None)
    assert bl.blocked("http://ok.org/one/page") and not bl.blocked("http://ok.org/two")
    chain = FilterChain(CleanConfig(urls=UrlFilterConfig(blocklist_file=str(f))))
    assert chain(Document("1", "text", "web", url="http://bad.com/")) == "url.blocklist"


def test_language_allowed_and_threshold(sample_dir):
    cfg = LangIdConfig(languages=["en"], min_score=0.65)
    de = (sample_dir / "lang/udhr/deu.txt").read_text()[:2000]
    en = (sample_dir / "lang/udhr/eng.txt").read_text()[:2000]
    assert language_verdict(*detect_language(en, cfg), cfg) is None
    assert language_verdict(*detect_language(de, cfg), cfg) == "language.not_allowed"
    assert language_verdict("en", 0.64, cfg) == "language.low_score"
    assert language_verdict("en", 0.65, cfg) is None
    assert language_verdict("de", 0.99, LangIdConfig(languages=[])) is None


def test_pii_redaction():
    text, n = redact_pii("mail john.doe@example.co.uk or 192.168.1.20, not 999.1.1.1; v6 2001:db8::1 at 10:30",
                         PiiConfig(email_replacement="<EMAIL>", ip_replacement="<IP>"))
    assert text == "mail <EMAIL> or <IP>, not 999.1.1.1; v6 <IP> at 10:30" and n == 3


def test_normalisation():
    cfg = NormalizeConfig()
    assert normalize_text("Caf\u00c3\u00a9 \u201cquoted\u201d", cfg) == "Caf\u00e9 \u201cquoted\u201d"  # mojibake fixed, quotes kept
    assert normalize_text("a\x07b\u200b  c \r\nline\n\n\n\nnext", cfg) == "ab c\nline\n\nnext"
    assert normalize_text("\ufb01", NormalizeConfig(unicode_form="NFKC")) == "fi"
    assert normalize_text("\ufb01", cfg) == "\ufb01"
    assert normalize_text("lone \ud800 surrogate", cfg) == "lone \ufffd surrogate"
    assert normalize_text("lone \ud800", NormalizeConfig(fix_encoding=False)).encode("utf-8")


def _reference_duplicated(words: list[str], n: int) -> int:
    """The plain walk of Gopher's duplicated n-gram rule (as in datatrove)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    seen, repeated, idx = set(), 0, 0
    while idx < len(grams):
        if grams[idx] in seen:
            repeated += sum(map(len, grams[idx]))
            idx += n
        else:
            seen.add(grams[idx])
            idx += 1
    return repeated


def _reference_top(words: list[str], n: int) -> int:
    from collections import Counter

    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


@pytest.mark.parametrize("seed", range(40))
def test_fast_ngram_counts_equal_the_plain_walk(seed):
    import random

    from data_pipeline.clean.filters.repeats import (
        NgramIndex,
        PlainNgrams,
        duplicated_ngram_chars,
        top_ngram_chars,
    )

    rng = random.Random(seed)
    vocab = ["a", "bb", "ccc", "dd", "e", "fff"][: rng.randint(1, 6)]
    words = [rng.choice(vocab) for _ in range(rng.randint(0, 60))]
    index, plain = NgramIndex(words), PlainNgrams(words)
    for n in range(2, 11):
        assert duplicated_ngram_chars(index, n) == _reference_duplicated(words, n) == plain.duplicated(n)
        assert top_ngram_chars(index, n) == _reference_top(words, n) == plain.top(n)


def test_hostile_chunks_split_in_linear_time():
    import time

    start = time.process_time()
    # quadratic affix peeling or URL-pattern backtracking would take minutes on these
    words = split_words("a:" * 50_000 + " (" + "ab-" * 20_000 + ") x" + ":" * 20_000 + " " + "a:a." * 10_000)
    assert len(words) > 100_000 and time.process_time() - start < 3.0


def test_symbol_words_and_punctuation_tokens():
    from data_pipeline.clean.filters.text import is_punct_token, is_symbol_word

    assert is_symbol_word("...") and is_symbol_word("|") and is_symbol_word("$")
    assert not is_symbol_word("😀") and not is_symbol_word("©") and not is_symbol_word("a.")
    assert is_punct_token(".") and is_punct_token("--") and not is_punct_token("|") and not is_punct_token("$")
    # an emoji counts as a word for Gopher: 49 words + 1 emoji reach min_doc_words=50
    assert quality(words(49) + " 😀", min_doc_words=50) is None
    assert quality(words(49) + " |", min_doc_words=50) == "gopher_quality.short_doc"
