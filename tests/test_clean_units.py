"""Pieces of the cleaning stage: extraction limits, executors, the report, config rules."""

from __future__ import annotations

import time

import pytest

from crucible.config import load_config
from crucible.errors import ConfigError
from data_pipeline.clean.config import CleanConfig, ExtractConfig
from data_pipeline.clean.documents import Document
from data_pipeline.clean.extract import ExtractTimeout, ExtractTooLarge, extract_html, time_limit
from data_pipeline.clean.process import extract_document
from data_pipeline.clean.report import funnel, summary_table
from data_pipeline.config import DataPrepConfig
from data_pipeline.executors.base import build_executor
from data_pipeline.executors.local import InlineExecutor, LocalExecutor

PAGE = (b"<html><head><title>t</title><script>var x = 1;</script></head><body>"
        b"<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
        b"<article><h1>A headline</h1><p>The first paragraph of the article has real sentences in it.</p>"
        b"<p>The second paragraph continues the story with more words.</p></article>"
        b"<footer>Copyright 2024</footer></body></html>")


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_extractors_keep_the_article(extractor):
    text = extract_html(PAGE, ExtractConfig(extractor=extractor))
    assert "first paragraph of the article" in text and "second paragraph" in text
    assert "var x" not in text


def test_oversized_html_is_not_parsed():
    with pytest.raises(ExtractTooLarge, match="max_html_bytes"):
        extract_html(b"<p>" + b"x" * 2000 + b"</p>", ExtractConfig(max_html_bytes=1000))
    doc = Document("d", "", "web", html=b"<p>" + b"x" * 2000, file="f.warc", offset=7)
    err = extract_document(doc, CleanConfig(extract=ExtractConfig(max_html_bytes=1000)), {})
    assert (err.kind, err.file, err.offset) == ("extract_too_large", "f.warc", 7) and doc.html is None


def test_time_limit_interrupts_a_hanging_extractor():
    start = time.monotonic()
    with pytest.raises(ExtractTimeout), time_limit(0.2):
        while True:
            pass
    assert time.monotonic() - start < 2


def test_executors():  # executor=ray: tests/test_ray.py
    assert isinstance(build_executor("local", 1), InlineExecutor)
    assert isinstance(build_executor("local", 2), LocalExecutor)
    assert sorted(LocalExecutor(2).map_unordered(abs, [-3, -1, -2])) == [1, 2, 3]


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="source names must be unique"):
        load_config(DataPrepConfig, None, ["data.sources=[{name: a, path: x}, {name: a, path: y}]"])
    with pytest.raises(ConfigError, match="data.dedup.bands"):
        load_config(DataPrepConfig, None, ["data.dedup.bands=0"])
    with pytest.raises(ConfigError, match="data.langid.min_score"):
        load_config(DataPrepConfig, None, ["data.langid.min_score=1.5"])


STATS = {
    "documents_read": 10, "documents_kept": 4, "dropped": {"c4.too_few_sentences": 2, "dedup.near": 1,
                                                           "language.not_allowed": 2},
    "errors": {"malformed_json": 1}, "chars_in": 100, "chars_out": 40,
    "per_source": {"web": {"read": 10, "kept": 4, "dropped": {"c4.too_few_sentences": 2, "dedup.near": 1,
                                                               "language.not_allowed": 2},
                           "errors": {"malformed_json": 1}, "chars_in": 100, "chars_out": 40}},
}


def test_funnel_follows_pipeline_order():
    assert funnel(STATS["per_source"]["web"]) == [("read", 10), ("error", 9), ("language", 7), ("c4", 5),
                                                  ("dedup", 4)]
    table = summary_table(STATS)
    assert "web" in table and "TOTAL" in table and "40.0%" in table and "malformed_json 1" in table


def test_stats_accounting_and_error_examples():
    from data_pipeline.clean.documents import ReadError
    from data_pipeline.clean.stats import Stats, check_invariant

    a, b = Stats(), Stats()
    for i in range(30):
        a.error(ReadError("malformed_json", "f.jsonl", i, "bad", "web"))
    b.error(ReadError("truncated_input", "g.jsonl.gz", 9, "cut", "web"))
    b.read("news", 10)
    b.keep("news", 8)
    b.read("news", 5)
    b.drop("news", "c4.too_few_sentences")
    a.merge(b)
    d = a.to_dict()
    check_invariant(d)
    assert d["documents_read"] == 33 and d["errors"] == {"malformed_json": 30, "truncated_input": 1}
    kinds = [e["kind"] for e in d["error_examples"]]
    assert kinds.count("malformed_json") == 20 and kinds.count("truncated_input") == 1
    a.source("news").kept += 1  # a document counted twice must be caught
    with pytest.raises(RuntimeError, match="accounting broken"):
        check_invariant(a.to_dict())


def test_document_chain_keeps_prose_and_redacts_pii(sample_dir):
    from data_pipeline.clean.filters.chain import FilterChain
    from data_pipeline.clean.process import clean_document

    cfg = CleanConfig()
    chain = FilterChain(cfg)
    article = (sample_dir / "news/lee_abc/lee_background.cor").read_text().splitlines()[0]
    doc = Document("a", article + " Write to press@abc.net.au for details.", "news")
    assert clean_document(doc, cfg, chain) is None
    assert doc.language == "en" and "press@abc.net.au" not in doc.text and "email@example.com" in doc.text
    assert clean_document(Document("b", " \n\t ", "news"), cfg, chain) == "empty.too_short"
    short = CleanConfig(output={"min_chars": 10})
    assert clean_document(Document("c", "123456789", "news"), short, chain) == "empty.too_short"
