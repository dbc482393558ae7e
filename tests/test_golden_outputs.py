"""Byte-identical data-stage outputs: clean shards, stats, tokenizer, token shards and manifest
written from the bundled sample must not change when the code is only restructured.

The checksums in ``tests/golden/sample_prepare.json`` were recorded before the data pipeline
was split into subpackages (issue 12). A library that writes these bytes (sentencepiece, ftfy,
resiliparse, py3langid, webdataset) at another version may legitimately change them; the test
then names the versions that differ instead of failing on checksums. After an intended change
of an output format, record again with ``python -m tests.test_golden_outputs --record``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "sample_prepare.json"
OVERRIDES = ["tokenizer.vocab_size=1024", "tokenizer.heldout_documents=20", "shard.seq_len=128",
             "shard.samples_per_shard=256", "workers=1"]
# libraries whose own output is part of these bytes
LIBRARIES = ("sentencepiece", "ftfy", "resiliparse", "py3langid", "xxhash", "numpy")
# manifest fields that name this machine or this checkout, not the data
VOLATILE_MANIFEST_KEYS = ("provenance",)


def prepare(out: Path) -> Path:
    from crucible.config import load_config
    from data_pipeline.config import DataPrepConfig
    from data_pipeline.stages import run_prepare_data

    cfg = load_config(DataPrepConfig, ROOT / "configs" / "data" / "sample.yaml",
                      [f"input={ROOT / 'data' / 'sample'}", f"output={out}", *OVERRIDES])
    run_prepare_data(cfg)
    return out


def canonical_manifest(path: Path) -> bytes:
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for key in VOLATILE_MANIFEST_KEYS:
        manifest.pop(key, None)
    manifest["tokenizer"] = {k: (Path(v).name if k == "path" else v)
                             for k, v in manifest["tokenizer"].items()}
    return json.dumps(manifest, sort_keys=True).encode()


def checksums(out: Path) -> dict[str, str]:
    files = sorted((out / "clean").glob("docs-*.tar")) + [out / "clean" / "stats.json",
                                                          out / "tokenizer" / "tokenizer.model"]
    files += sorted((out / "shards").rglob("*.tar"))
    sums = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    sums["shards/manifest.json (canonical)"] = hashlib.sha256(
        canonical_manifest(out / "shards" / "manifest.json")).hexdigest()
    return sums


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


@pytest.mark.slow
def test_sample_outputs_are_byte_identical_to_the_recorded_ones(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    changed = {k: (v, library_versions()[k]) for k, v in golden["versions"].items()
               if library_versions().get(k) != v}
    if changed:
        pytest.skip(f"recorded with other library versions {changed}; the bytes may differ for "
                    "that reason alone (record again with python -m tests.test_golden_outputs --record)")
    got = checksums(prepare(tmp_path / "out"))
    assert sorted(got) == sorted(golden["files"]), "the set of output files changed"
    differing = [name for name in golden["files"] if got[name] != golden["files"][name]]
    assert not differing, f"outputs differ from the recorded bytes: {differing}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = {"versions": library_versions(), "files": checksums(prepare(Path(tmp) / "out"))}
    GOLDEN.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"recorded {len(record['files'])} checksums in {GOLDEN}")
