"""executor=ray on a local 2-CPU Ray cluster: same bytes as executor=local, worker death, resume."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from crucible.config import load_config
from crucible.errors import DataError
from data_pipeline.clean import stage as clean_stage
from data_pipeline.clean.stage import run_clean
from data_pipeline.clean.stats import invariant_holds
from data_pipeline.config import DataPrepConfig
from data_pipeline.stages import run_prepare_data

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SMALL = ["tokenizer.vocab_size=512", "tokenizer.heldout_documents=20", "shard.seq_len=32",
         "shard.samples_per_shard=64", "data.output.shard_bytes=300000", "ray.dedup_buckets=5"]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def small_corpus(root: Path) -> Path:
    """Four pieces of one sample crawl file plus a news file, with cross-file exact duplicates."""
    lines = gzip.decompress((SAMPLE / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz")
                            .read_bytes()).splitlines(keepends=True)[:240]
    (root / "web").mkdir(parents=True)
    for i in range(4):
        (root / "web" / f"cc-{i}.jsonl").write_bytes(b"".join(lines[i * 60:(i + 1) * 60]))
    (root / "web" / "copies.jsonl").write_bytes(b"".join(lines[30:90]))
    (root / "web" / "bad.jsonl").write_bytes(b'{"text": "fine but short"}\n{broken\n')
    return root


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every output file except the ones that name the run's own folders (compared separately)."""
    skip = {"manifest.json", "provenance.json", "config.yaml"}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [path]


def as_local(path: Path, ray_root: Path, local_root: Path) -> dict:
    """A JSON/YAML output of the Ray run with its own folder names replaced by the local run's."""
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8").replace(str(ray_root), str(local_root)))


def test_clean_and_shard_on_ray_match_local_byte_for_byte(tmp_path):
    tok = tmp_path / "tokenizer"
    local_cfg = load_config(DataPrepConfig, ROOT / "configs/data/sample.yaml",
                            [f"input={SAMPLE}", f"tokenizer_dir={tok}", *SMALL, f"output={tmp_path / 'local'}", "workers=2"])
    ray_cfg = local_cfg.model_copy(update={"executor": "ray", "output": str(tmp_path / "ray")})
    run_prepare_data(local_cfg)
    steps = run_prepare_data(ray_cfg)["steps"]
    assert steps == {"clean": "done", "tokenizer": "skipped (complete)", "shards": "done"}

    for stage in ("clean", "shards"):
        local, on_ray = folder_bytes(tmp_path / "local" / stage), folder_bytes(tmp_path / "ray" / stage)
        assert any(name.endswith(".tar") for name in local)
        assert sorted(on_ray) == sorted(local)
        assert [n for n in local if local[n] != on_ray[n]] == []
    stats = json.loads((tmp_path / "ray/clean/stats.json").read_text())
    assert invariant_holds(stats) and stats["dropped"].get("dedup.exact", 0) > 0

    # The run records differ only in the executor setting. (Code version left out: another
    # engineer's commit between the two runs would change it, not the executor.)
    for name in ("shards/manifest.json", "shards/provenance.json", "clean/provenance.json", "clean/config.yaml"):
        a = as_local(tmp_path / "local" / name, tmp_path / "ray", tmp_path / "local")
        b = as_local(tmp_path / "ray" / name, tmp_path / "ray", tmp_path / "local")
        for record in (a, b):
            (record.get("provenance", record)).pop("code", None)
        diff = differences(a, b)
        assert diff and all(d.endswith(".executor") for d in diff), (name, diff)


def corpus_config(corpus: Path, out: Path, *overrides: str) -> DataPrepConfig:
    return load_config(DataPrepConfig, None, [f"input={corpus}", f"output={out}", "data.default_source=web",
                                              "data.output.write_rejected=true", *SMALL, *overrides])


def make_killer(marker_dir: Path, victim: int):
    """A ``process_input`` whose first attempt at input ``victim`` kills its own worker process
    after a few documents (partial files on disk); every attempt is recorded in ``marker_dir``."""
    def kill_once_mid_task(task):
        from data_pipeline.clean import process

        index = task[1].index
        attempts = marker_dir / f"{index}.attempts"
        with open(attempts, "a") as f:
            f.write(f"{os.getpid()}\n")
        if index == victim and len(attempts.read_text().splitlines()) == 1:
            real, seen = process.process_document, [0]

            def dying(*args, **kwargs):
                seen[0] += 1
                if seen[0] == 20:
                    os._exit(1)
                return real(*args, **kwargs)

            process.process_document = dying
        return process.process_input(task)

    return kill_once_mid_task


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in {"config.yaml", "provenance.json"}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("ref")
    corpus = small_corpus(root / "corpus")
    run_clean(corpus_config(corpus, root / "local", "workers=1"))
    return corpus, output_bytes(root / "local")


def test_worker_killed_mid_task_is_retried_and_output_unchanged(tmp_path, monkeypatch, reference):
    corpus, expected = reference
    markers = tmp_path / "attempts"
    markers.mkdir()
    monkeypatch.setattr(clean_stage, "process_input", make_killer(markers, victim=2))
    stats = run_clean(corpus_config(corpus, tmp_path / "out", "executor=ray", "ray.max_retries=2"))
    attempts = {int(p.name.split(".")[0]): p.read_text().split() for p in markers.glob("*.attempts")}
    assert len(attempts[2]) == 2 and attempts[2][0] != attempts[2][1]  # Ray reran it in a new worker
    assert all(len(a) == 1 for i, a in attempts.items() if i != 2)
    assert invariant_holds(stats)
    assert output_bytes(tmp_path / "out") == expected


def test_job_dies_after_the_per_file_tasks_then_resumes(tmp_path, monkeypatch, reference):
    corpus, expected = reference
    cfg = corpus_config(corpus, tmp_path / "out", "executor=ray")

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clean_stage, "find_run_duplicates", die)
    with pytest.raises(KeyboardInterrupt):
        run_clean(cfg)
    monkeypatch.undo()
    assert len(list((tmp_path / "out" / "_work").glob("*.done.json"))) == 6
    result = run_clean(cfg)
    assert result["resumed_inputs"] == 6
    assert output_bytes(tmp_path / "out") == expected


def test_strict_error_inside_a_ray_task_is_the_user_error(tmp_path, reference):
    corpus, _ = reference
    with pytest.raises(DataError, match="strict=true"):
        run_clean(corpus_config(corpus, tmp_path / "out", "executor=ray", "strict=true"))
