"""Stage launchers (build_tokenizer, shard) and prepare_data's skipping of finished steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crucible.config import load_config
from data_pipeline.config import DataPrepConfig
from data_pipeline.stages import run_prepare_data
from tests.datasets import sample_texts
from tests.test_shards import write_clean_shards

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["tokenizer.vocab_size=512", "tokenizer.heldout_documents=20", "shard.seq_len=32",
         "shard.samples_per_shard=64", "shard.validation_fraction=0.05"]


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launcher" / script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_build_tokenizer_then_shard_launchers(tmp_path):
    write_clean_shards(tmp_path / "clean", list(sample_texts()))
    tok = _launch("build_tokenizer.py", f"input={tmp_path / 'clean'}", f"output={tmp_path / 'tok'}", *SMALL)
    assert tok.returncode == 0, tok.stderr
    report = json.loads((tmp_path / "tok" / "report.json").read_text())
    assert report["vocab_size"] == 512 and report["hf_mismatched_documents"] == 0
    shard = _launch("shard.py", f"input={tmp_path / 'clean'}", f"tokenizer_dir={tmp_path / 'tok'}",
                    f"output={tmp_path / 'shards'}", *SMALL)
    assert shard.returncode == 0, shard.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["tokenizer"]["sha256"] == report["sha256"]


def test_launcher_bad_input_exits_2_with_one_line(tmp_path):
    proc = _launch("shard.py", f"input={tmp_path / 'missing'}", f"tokenizer_dir={tmp_path}",
                   f"output={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prepare_data_skips_finished_steps(tmp_path):
    write_clean_shards(tmp_path / "clean", list(sample_texts()))
    cfg = load_config(DataPrepConfig, None, [f"output={tmp_path}", *SMALL])
    first = run_prepare_data(cfg)
    assert first["steps"] == {"clean": "skipped (complete)", "tokenizer": "done", "shards": "done"}
    manifest = Path(first["manifest"])
    before = manifest.read_bytes()
    again = run_prepare_data(cfg)
    assert set(again["steps"].values()) == {"skipped (complete)"}
    assert manifest.read_bytes() == before
    # a changed shard setting redoes only the shards
    changed = run_prepare_data(cfg.model_copy(update={"shard": cfg.shard.model_copy(update={"seq_len": 16})}))
    assert changed["steps"]["tokenizer"] == "skipped (complete)" and changed["steps"]["shards"] == "done"
    assert json.loads(manifest.read_text())["seq_len"] == 16


@pytest.mark.slow
def test_shard_stage_killed_midway_then_rerun_is_byte_identical(tmp_path, tmp_path_factory):
    import os
    import signal
    import time

    from crucible.fileio import sha256_file
    from data_pipeline.shards.stage import run_shard
    from tests.datasets import shared_token_dataset

    manifest = shared_token_dataset(tmp_path_factory)
    tok = manifest.parent.parent / "tokenizer"
    write_clean_shards(tmp_path / "clean", list(sample_texts()))
    args = [f"input={tmp_path / 'clean'}", f"tokenizer_dir={tok}", "shard.seq_len=32",
            "shard.samples_per_shard=256", "shard.batch_documents=8"]
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launcher" / "shard.py"), *args,
                             f"output={killed_out}"], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(killed_out.glob("train/*.tar"))) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    was_killed = proc.returncode == -signal.SIGKILL
    if was_killed:
        assert not (killed_out / "manifest.json").exists()
    assert _launch("shard.py", *args, f"output={killed_out}").returncode == 0
    run_shard(load_config(DataPrepConfig, None, [*args, f"output={tmp_path / 'clean_run'}"]))

    def hashes(folder: Path) -> dict:
        return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*.tar"))}

    assert hashes(killed_out) == hashes(tmp_path / "clean_run")
    assert not list(killed_out.rglob("*.tmp"))
    assert was_killed, "the run finished before it could be killed; the byte check still ran"
