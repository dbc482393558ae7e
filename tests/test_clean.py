"""The cleaning stage end to end: shards, accounting, worker-count determinism, kill + resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from crucible.config import load_config
from crucible.errors import ConfigError, DataError
from data_pipeline.clean import stage as clean_stage
from data_pipeline.clean.filters.pii import EMAIL
from data_pipeline.clean.output import is_complete
from data_pipeline.clean.stage import run_clean
from data_pipeline.clean.stats import invariant_holds
from data_pipeline.config import DataPrepConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"

# End-to-end runs of the stage (a few seconds each, the shared reference run ~5 s); the fast
# unit tests of its parts are in test_clean_units.py, test_filters.py, test_readers.py, test_dedup.py.
pytestmark = pytest.mark.slow


def make_corpus(root: Path, pieces: int = 4) -> Path:
    """Small real inputs in several formats, with cross-file duplicates and bad records."""
    web = root / "web"
    news = root / "news"
    web.mkdir(parents=True)
    news.mkdir(parents=True)
    lines = gzip.decompress((SAMPLE / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz")
                            .read_bytes()).splitlines(keepends=True)
    per = len(lines) // pieces
    for i in range(pieces):
        (web / f"cc-{i:02d}.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[i * per:(i + 1) * per]), mtime=0))
    (web / "ccnet.jsonl").write_bytes((SAMPLE / "web/dolma_cc/cc_en_head-0091.jsonl").read_bytes())
    (web / "crawl.warc.gz").write_bytes((SAMPLE / "web/dolma_cc/sample-0001.warc.gz").read_bytes())
    (web / "bad.jsonl").write_bytes(b'{"text": "fine but short"}\n{broken\n')
    truncated = gzip.compress(b"".join(lines[:40]), mtime=0)
    (web / "truncated.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    (web / "empty.jsonl").write_bytes(b"")
    news_lines = (SAMPLE / "news/lee_abc/lee_background.cor").read_bytes().splitlines(keepends=True)
    (news / "a.cor").write_bytes(b"".join(news_lines[:150]))
    (news / "b.cor").write_bytes(b"".join(news_lines[100:250]))  # 50 exact duplicates of a.cor
    (news / "latin1.cor").write_bytes((SAMPLE / "news/lee_abc/lee.cor").read_bytes())
    return root


def corpus_config(corpus: Path, out: Path, *overrides: str) -> DataPrepConfig:
    cfg_file = out.parent / "corpus.yaml"
    cfg_file.write_text(json.dumps({
        "input": str(corpus), "output": str(out),
        "data": {"sources": [{"name": "web", "path": "web"},
                             {"name": "news", "path": "news", "format": "lines"}],
                 "output": {"shard_bytes": 200_000, "write_rejected": True}},
    }))
    return load_config(DataPrepConfig, cfg_file, list(overrides))


def output_bytes(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("docs-*.tar")) + sorted((out / "rejected").glob("*.tar")) + [out / "stats.json"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def read_shards(out: Path) -> list[tuple[str, str, dict]]:
    samples = []
    for shard in sorted(out.glob("docs-*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uname == "crucible" for m in members)
            files = {m.name: tar.extractfile(m).read() for m in members}
        keys = sorted({name.rsplit(".", 1)[0] for name in files})
        for k in keys:
            samples.append((k, files[f"{k}.txt"].decode("utf-8"), json.loads(files[f"{k}.json"])))
    return samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run with 2 worker processes."""
    out = tmp_path_factory.mktemp("ref") / "clean"
    stats = run_clean(corpus_config(corpus, out, "workers=2"))
    return out, stats


def test_output_layout_and_accounting(reference):
    out, stats = reference
    assert is_complete(out)
    for name in ("stats.json", "config.yaml", "provenance.json", "_SUCCESS"):
        assert (out / name).is_file()
    assert not (out / "_work").exists()
    assert len(list(out.glob("docs-*.tar"))) >= 2  # shard_bytes=200 kB splits the output
    saved = json.loads((out / "stats.json").read_text())
    assert invariant_holds(saved) and all(invariant_holds(s) for s in saved["per_source"].values())
    assert saved["documents_kept"] == len(read_shards(out)) > 100
    assert set(saved["per_source"]) == {"web", "news"}
    assert saved["errors"] == {"empty_file": 1, "malformed_json": 1, "truncated_input": 1}
    assert any(e["file"] == "bad.jsonl" and e["offset"] == 2 for e in saved["error_examples"])
    # b.cor repeats 50 articles of a.cor; those that pass the filters go as exact duplicates
    assert 40 <= saved["per_source"]["news"]["dropped"]["dedup.exact"] <= 50
    assert saved["per_language"]["en"]["kept"] == saved["documents_kept"]
    assert saved["fallbacks"]["decoded_cp1252"] == 1
    assert saved["chars_out"] < saved["chars_in"]
    assert stats["resumed_inputs"] == 0


def test_samples_carry_text_and_metadata(reference):
    out, _ = reference
    samples = read_shards(out)
    keys = [k for k, _, _ in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for _, text, meta in samples:
        assert text.strip() and set(meta) == {"id", "source", "url", "language", "metadata"}
        assert meta["language"] == "en"
        assert all(m == "email@example.com" for m in EMAIL.findall(text))
    assert any(m["url"] and m["source"] == "web" for _, _, m in samples)
    rejected = list((out / "rejected").glob("rejected-*.tar"))
    assert rejected
    with tarfile.open(rejected[0]) as tar:
        first_json = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        assert "reason" in json.loads(tar.extractfile(first_json).read())


def test_worker_count_and_rerun_determinism(corpus, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "clean1"
    run_clean(corpus_config(corpus, out, "workers=1"))
    assert output_bytes(out) == output_bytes(ref_out)


def test_complete_output_is_not_redone(reference, monkeypatch):
    out, _ = reference
    monkeypatch.setattr(clean_stage, "expand_inputs", lambda *a: pytest.fail("inputs re-read"))
    cfg = load_config(DataPrepConfig, out / "config.yaml")
    assert run_clean(cfg)["documents_kept"] > 0


def test_strict_mode_names_file_and_offset(corpus, tmp_path):
    cfg = corpus_config(corpus, tmp_path / "strict", "strict=true")
    with pytest.raises(DataError, match=r"bad.jsonl at offset 2"):
        run_clean(cfg)


def test_partial_output_with_other_config_is_refused(corpus, tmp_path):
    out = tmp_path / "c"
    (out / "_work").mkdir(parents=True)
    (out / "_work" / "fingerprint").write_text("something else\n")
    with pytest.raises(ConfigError, match="different data config"):
        run_clean(corpus_config(corpus, out))


def test_killed_run_resumes_without_redoing_finished_inputs(tmp_path, reference, corpus, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "killed"
    cfg = corpus_config(corpus, out)
    cfg_file = tmp_path / "corpus.yaml"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launcher/clean.py"), "--config", str(cfg_file), "workers=1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = out / "_work"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("*.done.json"))) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {int(p.name[:6]) for p in work.glob("*.done.json")}
    n_inputs = len(clean_stage.expand_inputs(cfg.data, cfg.input)[0])
    assert 2 <= len(finished) < n_inputs, "the run must be killed with inputs finished and others pending"
    assert not is_complete(out)

    processed: list[int] = []
    real = clean_stage.process_input
    monkeypatch.setattr(clean_stage, "process_input", lambda task: processed.append(task[1].index) or real(task))
    stats = run_clean(corpus_config(corpus, out, "workers=1"))
    assert stats["resumed_inputs"] == len(finished)
    assert not set(processed) & finished and set(processed) | finished == set(range(n_inputs))
    assert output_bytes(out) == output_bytes(ref_out)


def test_launcher_and_report(reference, tmp_path):
    out, _ = reference
    report = [sys.executable, str(ROOT / "launcher/report.py"), str(out), "--out"]
    proc = subprocess.run([*report, str(tmp_path / "r.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "funnel.png").read_bytes()[:4] == b"\x89PNG" and "TOTAL" in proc.stdout
    assert "![data funnel](funnel.png)" in (tmp_path / "r.md").read_text()
    # --out was the funnel PNG's path before the report: refused with the fix, nothing written
    proc = subprocess.run([*report, str(tmp_path / "f.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "r.md" not in proc.stderr and "f.md" in proc.stderr, proc.stderr
    assert not (tmp_path / "f.png").exists() and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/clean.py"), f"input={tmp_path}/none",
                           f"output={tmp_path}/o"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no input files" in proc.stderr and "Traceback" not in proc.stderr


def test_finished_output_with_other_config_is_refused(reference):
    out, _ = reference
    cfg = load_config(DataPrepConfig, out / "config.yaml", ["data.dedup.seed=7"])
    with pytest.raises(ConfigError, match="different input or data config"):
        run_clean(cfg)


def test_lone_surrogates_and_odd_metadata_never_crash(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    text = (SAMPLE / "news/lee_abc/lee_background.cor").read_text().splitlines()[0].replace('"', "'")
    (src / "a.jsonl").write_text(
        '{"id": "bad\\ud800id", "url": "http://x.org/\\udfff", "text": "' + text + ' \\ud83d The end."}\n')
    cfg = load_config(DataPrepConfig, None, [f"input={src}", f"output={tmp_path / 'out'}", "workers=1"])
    stats = run_clean(cfg)
    assert stats["documents_kept"] == 1, stats["dropped"]
    [(_, kept_text, meta)] = read_shards(tmp_path / "out")
    assert meta["id"] == "bad\ud800id" and kept_text.endswith("\ufffd The end.")
