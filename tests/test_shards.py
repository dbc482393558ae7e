"""Token shards: exact document round trip, manifest accounting, determinism, clean-shard input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from crucible.config import load_config
from crucible.errors import ConfigError, DataError
from crucible.fileio import sha256_file
from data_pipeline.clean.output import atomic_tar_writer, iter_clean_documents
from data_pipeline.config import DataPrepConfig
from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.manifest import load_manifest
from data_pipeline.shards.packing import Packer, is_validation, split_text, token_dtype
from data_pipeline.shards.stage import run_shard
from data_pipeline.shards.verify import verify_manifests
from data_pipeline.shards.writer import write_token_shards
from tests.datasets import read_split_samples, sample_texts, shared_token_dataset


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def sp(manifest) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(manifest.parent.parent / "tokenizer" / "tokenizer.model"))


def _stream(manifest: Path, split: str) -> np.ndarray:
    samples = read_split_samples(manifest, split)
    return np.frombuffer(b"".join(samples), dtype="<u2")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_shards_give_back_every_document_in_order(manifest, sp, split):
    data = json.loads(manifest.read_text())
    cfg = ShardConfig(**data["shard_config"])
    docs = [t for t in sample_texts()
            if is_validation(t, cfg.validation_fraction, cfg.split_seed) == (split == "validation")]
    stream = _stream(manifest, split)
    expected = np.concatenate([np.array(sp.encode(d) + [sp.eos_id()]) for d in docs])
    tail = data["totals"][split]["dropped_tail_tokens"]
    assert len(stream) + tail == len(expected) and 0 <= tail <= cfg.seq_len
    assert np.array_equal(stream, expected[: len(stream)])
    # split at EOS: every complete document decodes to its exact text, in order
    ends = np.flatnonzero(stream == sp.eos_id())
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [sp.decode(stream[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
    assert decoded == docs[: len(decoded)]
    assert len(decoded) in (len(docs), len(docs) - 1)  # only the tail document may be cut


def test_manifest_counts_and_checksums_match_the_tars(manifest):
    m = load_manifest(manifest)
    checks = verify_manifests([m])
    assert [c.problem for c in checks if not c.ok] == []
    assert len(checks) == sum(len(e) for e in m.data["splits"].values())
    data = m.data
    assert data["seq_len"] == 64 and data["dtype"] == "uint16"
    assert data["tokenizer"]["vocab_size"] == 512 and data["tokenizer"]["eos_id"] == 2
    assert data["tokenizer"]["sha256"] == sha256_file(manifest.parent.parent / "tokenizer" / "tokenizer.model")
    for split, entries in data["splits"].items():
        assert len(read_split_samples(manifest, split)) == sum(e["samples"] for e in entries)
        for e in entries:
            assert e["tokens"] == e["samples"] * 65
        t = data["totals"][split]
        assert t["samples"] == sum(e["samples"] for e in entries) and t["shards"] == len(entries)
        assert t["tokens"] + t["dropped_tail_tokens"] == t["tokens_in"]
    assert data["totals"]["train"]["documents"] + data["totals"]["validation"]["documents"] == \
        sum(1 for _ in sample_texts())
    assert "provenance" in data and (manifest.parent / "provenance.json").is_file()


def _texts(n: int = 150):
    return list(sample_texts())[:n]


def _shard_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*.tar"))}


def test_byte_identical_for_any_worker_count_and_after_a_crash(manifest, tmp_path):
    tok = manifest.parent.parent / "tokenizer"
    base = {"seq_len": 32, "samples_per_shard": 32, "validation_fraction": 0.1}
    a = write_token_shards(_texts(), tok, tmp_path / "a", ShardConfig(workers=1, batch_documents=7, **base))
    b = write_token_shards(_texts(), tok, tmp_path / "b", ShardConfig(workers=2, batch_documents=64, **base))
    assert _shard_hashes(tmp_path / "a") == _shard_hashes(tmp_path / "b")
    assert a["splits"] == b["splits"] and a["totals"] == b["totals"]

    def crashing():
        for i, t in enumerate(_texts()):
            if i == 100:
                raise KeyboardInterrupt("killed")
            yield t

    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(crashing(), tok, out, ShardConfig(batch_documents=16, **base))
    assert not (out / "manifest.json").exists() and list(out.rglob("*.tar"))
    write_token_shards(_texts(), tok, out, ShardConfig(**base))
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "a")
    assert not list(out.rglob("*.tmp"))


def test_long_documents_are_split_and_still_round_trip(manifest, sp, tmp_path):
    tok = manifest.parent.parent / "tokenizer"
    long_doc = "\n".join(_texts(40))
    assert len(long_doc) > 20_000
    cfg = ShardConfig(seq_len=16, samples_per_shard=100, validation_fraction=0.0, max_chunk_chars=2000)
    m = write_token_shards([long_doc, "short one"], tok, tmp_path, cfg)
    assert m["totals"]["split_long_documents_pieces"] >= 10
    stream = _stream(tmp_path / "manifest.json", "train")
    ends = np.flatnonzero(stream == sp.eos_id())
    assert sp.decode(stream[: ends[0]].tolist()) == long_doc


def test_split_text_and_packer():
    text = ("para one line\n" * 300) + ("x" * 5000) + (" word" * 800)
    parts = split_text(text, 1000)
    assert "".join(parts) == text and all(len(p) <= 1000 for p in parts)
    packer = Packer(seq_len=4, dtype=np.uint16)
    out = packer.add([np.array([5, 6, 2]), np.array([7, 2])])
    assert out.tolist() == [[5, 6, 2, 7, 2]] and packer.tail_tokens == 0
    out = packer.add([np.array([8, 9, 10, 2])])
    assert out.shape == (0, 5) and packer.tail_tokens == 4
    out = packer.add([np.array([11, 12, 2])])
    assert out.tolist() == [[8, 9, 10, 2, 11]] and packer.tail_tokens == 2


def test_token_dtype_choice():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ConfigError, match="shard.dtype=uint16"):
        token_dtype(70000, "uint16")


def write_clean_shards(folder: Path, docs: list[str], per_shard: int = 50, success: bool = True) -> None:
    """Clean shards exactly as the cleaning stage writes them (the contract)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(docs), per_shard):
        with atomic_tar_writer(folder / f"docs-{s // per_shard:06d}.tar") as w:
            for i, text in enumerate(docs[s:s + per_shard], start=s):
                meta = {"id": f"doc-{i}", "source": "web", "url": None, "language": "en", "metadata": {}}
                w.write({"__key__": f"{i:09d}", "txt": text.encode(), "json": json.dumps(meta).encode()})
    (folder / "stats.json").write_text("{}")
    if success:
        (folder / "_SUCCESS").write_text("")


def test_clean_shards_are_read_in_order_and_sharded(manifest, tmp_path):
    docs = _texts(120)
    write_clean_shards(tmp_path / "clean", docs)
    got = list(iter_clean_documents(tmp_path / "clean"))
    assert [d["text"] for d in got] == docs and got[5]["id"] == "doc-5"
    cfg = load_config(DataPrepConfig, None, [
        f"input={tmp_path / 'clean'}", f"output={tmp_path / 'shards'}",
        f"tokenizer_dir={manifest.parent.parent / 'tokenizer'}", "shard.seq_len=32",
    ])
    m = run_shard(cfg)
    assert m["totals"]["documents"] == 120 and (tmp_path / "shards" / "config.yaml").is_file()


def test_unfinished_clean_output_is_refused(tmp_path):
    write_clean_shards(tmp_path / "clean", ["a", "b"], success=False)
    with pytest.raises(DataError, match="_SUCCESS"):
        list(iter_clean_documents(tmp_path / "clean"))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_clean_documents(tmp_path / "nope"))
