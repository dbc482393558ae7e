"""Readers: every input format, and bad input counted (or failing loudly in strict mode)."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest
import zstandard

from crucible.errors import DataError
from data_pipeline.clean.config import CleanConfig, SourceConfig
from data_pipeline.clean.documents import Document, ReadError
from data_pipeline.clean.readers.inputs import expand_inputs, source_config
from data_pipeline.clean.readers.registry import detect_format, read_input
from data_pipeline.clean.readers.streams import decode_text

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
JSONL = [{"id": f"d{i}", "text": f"document number {i}", "url": f"http://x.org/{i}"} for i in range(5)]


def _read(path: Path, fmt: str = "auto", **source) -> list:
    cfg = CleanConfig(sources=[SourceConfig(name="s", path=str(path), format=fmt, **source)])
    files, _ = expand_inputs(cfg, None)
    out = []
    for f in files:
        out.extend(read_input(f, source_config(cfg, "s"), cfg.max_doc_bytes))
    return out


def _jsonl_bytes(records=JSONL) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _docs(records):
    return [r for r in records if isinstance(r, Document)]


def _errors(records):
    return [r for r in records if isinstance(r, ReadError)]


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl", lambda b: b), (".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_all_compressions(tmp_path, suffix, compress):
    p = tmp_path / f"a{suffix}"
    p.write_bytes(compress(_jsonl_bytes()))
    docs = _docs(_read(p))
    assert [d.id for d in docs] == [r["id"] for r in JSONL]
    assert docs[2].text == "document number 2" and docs[2].url == "http://x.org/2"
    assert all(d.source == "s" for d in docs)


def test_dolma_and_ccnet_schemas_work_as_is():
    docs = _docs(_read(SAMPLE / "web/dolma_cc/000.json.gz"))
    assert len(docs) == 10 and all(d.text for d in docs)
    ccnet = _docs(_read(SAMPLE / "web/dolma_cc/cc_en_head-0091.jsonl"))  # text in raw_content
    assert len(ccnet) == 10 and all(len(d.text) > 100 for d in ccnet)


def test_custom_fields(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"key": "k1", "body": {"content": "hello"}, "lang": "en"}) + "\n")
    [doc] = _docs(_read(p, text_fields=["body.content"], id_fields=["key"], metadata_fields=["lang"]))
    assert (doc.id, doc.text, doc.metadata) == ("k1", "hello", {"lang": "en"})


def test_text_file_per_file_and_per_line(tmp_path):
    (tmp_path / "one.txt").write_text("line one\nline two\n")
    assert [d.text for d in _docs(_read(tmp_path / "one.txt"))] == ["line one\nline two\n"]
    assert [d.text for d in _docs(_read(tmp_path / "one.txt", fmt="lines"))] == ["line one", "line two"]


def test_parquet_csv_tsv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["alpha", "beta"]}), tmp_path / "t.parquet")
    assert [d.text for d in _docs(_read(tmp_path / "t.parquet"))] == ["alpha", "beta"]
    (tmp_path / "t.csv").write_text('id,text\n1,"hello, world"\n2,"multi\nline"\n')
    assert [d.text for d in _docs(_read(tmp_path / "t.csv"))] == ["hello, world", "multi\nline"]
    (tmp_path / "t.tsv").write_text("3\tno header here\n")
    [doc] = _docs(_read(tmp_path / "t.tsv", csv_header=False, text_fields=["1"]))
    assert doc.text == "no header here"


def test_warc_wet_html():
    warc = _read(SAMPLE / "web/dolma_cc/sample-0000.warc.gz")
    docs = _docs(warc)
    assert len(docs) == 22 and not _errors(warc)
    assert all(d.html and d.url.startswith("http") for d in docs)
    [wet] = _docs(_read(SAMPLE / "web/commoncrawl_whirlwind/whirlwind.warc.wet.gz"))
    assert wet.html is None and len(wet.text) > 1000


def test_html_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.html").write_text("<html><body><p>hi</p></body></html>")
    (tmp_path / "notes.md").write_text("not read")
    cfg = CleanConfig(sources=[SourceConfig(name="s", path=str(tmp_path))])
    files, skipped = expand_inputs(cfg, None)
    assert [f.name for f in files] == ["sub/p.html"] and skipped == ["s:notes.md"]
    assert _docs(_read(tmp_path / "**/*.html"))[0].html.startswith(b"<html>")


def test_format_detection():
    assert detect_format("a/b.warc.wet.gz") == "wet"
    assert detect_format("x.json.gz") == "jsonl"
    assert detect_format("x.WARC.GZ") == "warc"
    assert detect_format("x.warc.wat.gz") is None and detect_format("README.md") is None


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(DataError, match="no input files"):
        _read(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- bad input


def test_truncated_gzip_keeps_records_before_the_break(tmp_path):
    data = gzip.compress(_jsonl_bytes(JSONL * 50))
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    recs = _read(p)
    assert len(_docs(recs)) > 0
    [err] = _errors(recs)
    assert err.kind == "truncated_input" and err.file == "t.jsonl.gz" and err.offset > 0


def test_truncated_zstd(tmp_path):
    data = zstandard.ZstdCompressor().compress(_jsonl_bytes(JSONL * 50))
    p = tmp_path / "t.jsonl.zst"
    p.write_bytes(data[: len(data) // 2])
    errs = _errors(_read(p))
    assert [e.kind for e in errs] in (["truncated_input"], ["corrupt_input"])


def test_malformed_json_lines_are_counted(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{not json\n[1, 2]\n{"id": 5}\n{"text": "also ok"}\n')
    recs = _read(p)
    assert [d.text for d in _docs(recs)] == ["ok", "also ok"]
    assert [(e.kind, e.offset) for e in _errors(recs)] == [
        ("malformed_json", 2), ("malformed_json", 3), ("missing_text", 4)]


def test_invalid_utf8_uses_documented_fallback(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\u00e9 na\u00efve".encode("cp1252"))
    reader = read_input(*_one(p))
    [doc] = list(reader)
    assert doc.text == "caf\u00e9 na\u00efve" and reader.fallbacks == {"decoded_cp1252": 1}
    fallbacks: dict = {}
    assert decode_text(b"\x81\x8d ok", fallbacks) == "\ufffd\ufffd ok"
    assert fallbacks == {"decoded_utf8_replace": 1}


def _one(path: Path):
    cfg = CleanConfig(sources=[SourceConfig(name="s", path=str(path))])
    files, _ = expand_inputs(cfg, None)
    return files[0], source_config(cfg, "s"), cfg.max_doc_bytes


def test_binary_and_empty_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.warc").write_bytes(b"")
    kinds = sorted(e.kind for e in _errors(_read(tmp_path)))
    assert kinds == ["binary_file", "empty_file", "empty_file"]


def test_huge_single_line_is_skipped_with_bounded_memory(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "before"}\n')
        f.write(b'{"text": "' + b"x" * (50 * 2**20) + b'"}\n')
        f.write(b'{"text": "after"}\n')
    recs = _read(p)
    assert [d.text for d in _docs(recs)] == ["before", "after"]
    [err] = _errors(recs)
    assert err.kind == "document_too_large" and err.offset == 2


def test_malformed_warc(tmp_path):
    p = tmp_path / "bad.warc"
    p.write_bytes(b"this is not a warc file at all\r\n\r\n" * 10)
    [err] = _errors(_read(p))
    assert err.kind == "malformed_warc"
    good = (SAMPLE / "web/commoncrawl_whirlwind/whirlwind.warc").read_bytes()
    q = tmp_path / "half.warc"
    q.write_bytes(good[: len(good) // 2])
    recs = _read(q)
    assert len(recs) >= 1  # whatever survives is a document or a counted error, never a crash


def test_every_configurable_format_has_one_reader():
    from typing import get_args

    from data_pipeline.clean.config import InputFormat
    from data_pipeline.clean.readers.registry import FORMAT_BY_EXTENSION, READERS

    assert sorted(READERS) == sorted(set(get_args(InputFormat)) - {"auto"})
    assert set(FORMAT_BY_EXTENSION.values()) <= set(READERS)
