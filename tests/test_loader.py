"""The resumable streaming loader: order, resume, rank shares, world-size changes, mixing, errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from crucible.errors import DataError
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.evaluation import build_eval_loader
from data_pipeline.loader.reading import ShardError
from data_pipeline.loader.train import build_train_loader
from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.writer import write_token_shards
from tests.datasets import read_split_samples, sample_texts, shared_token_dataset


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def train_samples(manifest) -> list[bytes]:
    samples = read_split_samples(manifest, "train")
    assert len(set(samples)) == len(samples), "test data must have distinct samples"
    return samples


def _cfg(manifest, **kw) -> LoaderConfig:
    return LoaderConfig(manifests=[str(manifest)], **kw)


def _key(row: torch.Tensor) -> bytes:
    return row.numpy().astype("<u2").tobytes()


def _take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_shape_dtype_and_samples_come_from_the_shards(manifest, train_samples):
    loader = build_train_loader(_cfg(manifest), micro_batch_size=4, rank=0, world_size=1)
    assert (loader.seq_len, loader.vocab_size) == (64, 512)
    assert loader.tokenizer["eos_id"] == 2 and len(loader.manifest_sha256s) == 1
    batch = _take(loader, 1)[0]
    assert batch.shape == (4, 65) and batch.dtype == torch.long
    known = set(train_samples)
    assert all(_key(row) in known for row in batch)


def test_order_is_a_pure_function_of_seed(manifest):
    a = _take(build_train_loader(_cfg(manifest), 4, 0, 1), 6)
    b = _take(build_train_loader(_cfg(manifest), 4, 0, 1), 6)
    c = _take(build_train_loader(_cfg(manifest, seed=7), 4, 0, 1), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_resume_gives_the_next_batches_and_reads_little(manifest):
    cfg = _cfg(manifest)
    reference = _take(build_train_loader(cfg, 4, 0, 1), 12)
    first = build_train_loader(cfg, 4, 0, 1)
    _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    resumed = build_train_loader(cfg, 4, 0, 1)
    resumed.load_state_dict(state)
    after = _take(resumed, 5)
    assert all(torch.equal(x, y) for x, y in zip(reference[7:], after, strict=True))
    # no replay: without checksums, 5 batches of 4 samples read, each one header + sample
    data = json.loads(Path(manifest).read_text())
    per_sample = data["sample_layout"]["header_bytes"] + data["sample_layout"]["sample_bytes"]
    unverified = build_train_loader(_cfg(manifest, verify_checksums=False), 4, 0, 1)
    unverified.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(after, _take(unverified, 5), strict=True))
    assert unverified.stats["bytes_read"] == 5 * 4 * per_sample
    # with checksums (the default): only the shards those samples come from, each read once
    # whole (hashed) and served from the same pages; at most one shuffle window of 4 shards
    shard_bytes = data["splits"]["train"][0]["bytes"]
    assert resumed.stats["bytes_read"] == resumed.stats["verified_bytes"]
    assert resumed.stats["verified_bytes"] == resumed.stats["verified_shards"] * shard_bytes
    assert 1 <= resumed.stats["verified_shards"] <= 4


def test_resume_with_two_workers_matches_uninterrupted_run(manifest):
    reference = _take(build_train_loader(_cfg(manifest), 4, 0, 1), 10)
    workers = _cfg(manifest, num_workers=2)
    first = build_train_loader(workers, 4, 0, 1)
    got = _take(first, 4)
    assert all(torch.equal(x, y) for x, y in zip(reference[:4], got, strict=True))
    state = first.state_dict()
    resumed = build_train_loader(workers, 4, 0, 1)
    resumed.load_state_dict(state)
    after = _take(resumed, 6)
    assert all(torch.equal(x, y) for x, y in zip(reference[4:], after, strict=True))


def test_two_ranks_disjoint_equal_batches_cover_the_epoch(manifest, train_samples):
    n, b = len(train_samples), 8
    full = n // (2 * b)  # global batches entirely inside epoch 0
    remainder = n - full * 2 * b
    assert remainder > 0, "pick a batch size that leaves a remainder"
    loaders = [build_train_loader(_cfg(manifest), b, r, 2) for r in range(2)]
    per_rank = [[_key(row) for batch in _take(ld, full + 1) for row in batch] for ld in loaders]
    epoch = [per_rank[r][: full * b] for r in range(2)]
    assert len(epoch[0]) == len(epoch[1]) == full * b
    assert not set(epoch[0]) & set(epoch[1])
    seen = set(epoch[0]) | set(epoch[1])
    assert len(seen) == full * 2 * b
    # carried-over remainder: the next global batch holds the rest of epoch 0 first
    nxt = per_rank[0][full * b:] + per_rank[1][full * b:]
    assert set(nxt[:remainder]) == set(train_samples) - seen
    assert loaders[0].state_dict() == loaders[1].state_dict()


@pytest.mark.parametrize("before,after", [((2, 8), (1, 5)), ((1, 6), (2, 3))])
def test_world_size_change_finishes_the_epoch_exactly_once(manifest, train_samples, before, after):
    n = len(train_samples)
    (w1, b1), (w2, b2) = before, after
    steps1 = 37
    consumed = steps1 * w1 * b1
    first = [build_train_loader(_cfg(manifest), b1, r, w1) for r in range(w1)]
    seen = [_key(row) for ld in first for batch in _take(ld, steps1) for row in batch]
    state = first[0].state_dict()
    assert state["consumed_samples"] == consumed
    second = [build_train_loader(_cfg(manifest), b2, r, w2) for r in range(w2)]
    for ld in second:
        ld.load_state_dict(state)
    steps2 = -(-(n - consumed) // (w2 * b2))
    rows = [[_key(row) for batch in _take(ld, steps2) for row in batch] for ld in second]
    # interleave ranks back into global slot order, keep the slots of epoch 0
    ordered = [rows[r][s * b2 + i] for s in range(steps2) for r in range(w2) for i in range(b2)]
    seen += ordered[: n - consumed]
    counts = Counter(seen)
    assert len(seen) == n and set(counts.values()) == {1} and set(seen) == set(train_samples)


def test_state_depends_on_consumed_samples_not_world_size(manifest):
    one = build_train_loader(_cfg(manifest), 8, 0, 1)
    two = build_train_loader(_cfg(manifest), 4, 1, 2)
    _take(one, 3)
    _take(two, 3)
    assert one.state_dict() == two.state_dict()


def test_wrong_state_is_refused(manifest):
    loader = build_train_loader(_cfg(manifest), 4, 0, 1)
    state = loader.state_dict()
    other = build_train_loader(_cfg(manifest, seed=99), 4, 0, 1)
    with pytest.raises(DataError, match="data.seed"):
        other.load_state_dict(state)
    bad = dict(state, manifest_sha256s=["0" * 64])
    with pytest.raises(DataError, match="same manifests"):
        loader.load_state_dict(bad)


@pytest.fixture(scope="module")
def news_manifest(manifest, tmp_path_factory) -> Path:
    """A second source (news lines only) encoded with the same tokenizer."""
    tok_dir = Path(manifest).parent.parent / "tokenizer"
    out = tmp_path_factory.mktemp("news_tokens")
    texts = [t for t in sample_texts() if "\n" not in t][-60:][::-1]  # packed unlike the web set
    write_token_shards(texts, tok_dir, out, ShardConfig(seq_len=64, samples_per_shard=64,
                                                        validation_fraction=0.0))
    return out / "manifest.json"


def test_mixing_follows_the_weights(manifest, news_manifest, train_samples):
    news = set(read_split_samples(news_manifest, "train"))
    assert not news & set(train_samples)
    cfg = LoaderConfig(manifests=[str(manifest), str(news_manifest)], weights=[0.7, 0.3])
    loader = build_train_loader(cfg, 10, 0, 1)
    rows = [_key(row) for batch in _take(loader, 200) for row in batch]
    from_news = sum(r in news for r in rows)
    # smooth weighted round robin: every prefix is within one sample of its share
    assert abs(from_news - 0.3 * len(rows)) <= 1
    state = loader.state_dict()
    assert state["sources"][1]["consumed_samples"] == from_news
    # the small news source wraps into later epochs on its own
    assert state["sources"][1]["epoch"] >= 1 and state["sources"][0]["epoch"] == 0
    resumed = build_train_loader(cfg, 10, 0, 1)
    resumed.load_state_dict(state)
    assert torch.equal(_take(resumed, 1)[0], _take(loader, 1)[0])


def test_mismatched_manifests_are_refused(manifest, tmp_path):
    other = json.loads(Path(manifest).read_text())
    other["seq_len"] = 32
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(other))
    with pytest.raises(DataError, match="seq_len"):
        build_train_loader(LoaderConfig(manifests=[str(manifest), str(path)]), 4, 0, 1)


def test_startup_reads_only_the_manifest(manifest, tmp_path):
    copy = tmp_path / "m"
    copy.mkdir()
    shutil.copy(manifest, copy / "manifest.json")  # no shards beside it
    loader = build_train_loader(_cfg(copy / "manifest.json"), 4, 0, 1)
    assert loader.stats["bytes_read"] == 0
    with pytest.raises(ShardError, match="tokens-0000"):
        _take(loader, 1)


def _copy_dataset(manifest: Path, dest: Path) -> Path:
    shutil.copytree(Path(manifest).parent, dest)
    return dest / "manifest.json"


def _all_train_shards_damaged(manifest: Path, how: str) -> list[Path]:
    data = json.loads(manifest.read_text())
    paths = [manifest.parent / e["path"] for e in data["splits"]["train"]]
    for path in paths[:3]:
        raw = bytearray(path.read_bytes())
        if how == "truncate":
            path.write_bytes(raw[: len(raw) // 2])
        else:
            raw[data["sample_layout"]["header_bytes"] - 512:] = b"\x00" * (len(raw) - 1024)
            path.write_bytes(raw[: len(raw)])
    return paths[:3]


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_corrupt_shard_error_names_it(manifest, tmp_path, how):
    m = _copy_dataset(manifest, tmp_path / "ds")
    damaged = _all_train_shards_damaged(m, how)
    loader = build_train_loader(_cfg(m, shuffle_buffer_shards=1000), 8, 0, 1)
    with pytest.raises(ShardError) as err:
        _take(loader, 20)
    assert any(str(p) in str(err.value) for p in damaged)
    assert "on_corrupt_shard=skip" in str(err.value)


def test_corrupt_shard_skipped_and_counted(manifest, tmp_path):
    m = _copy_dataset(manifest, tmp_path / "ds")
    damaged = _all_train_shards_damaged(m, "truncate")
    loader = build_train_loader(_cfg(m, on_corrupt_shard="skip", shuffle_buffer_shards=1000), 8, 0, 1)
    batches = _take(loader, 50)
    assert all(b.shape == (8, 65) for b in batches)
    assert loader.stats["skipped_samples"] > 0
    assert set(loader.stats["corrupt_shards"]) <= {str(p) for p in damaged}
    assert loader.stats["corrupt_shards"]


def _kept_rows(loader) -> list[bytes]:
    return [_key(row) for batch in loader for row, keep in zip(batch.tokens, batch.keep) if keep]


def test_eval_loader_is_finite_deterministic_and_split_across_ranks(manifest):
    val = read_split_samples(manifest, "validation")
    ranks = [build_eval_loader(_cfg(manifest), 4, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-len(val) // 8)  # the last global batch is padded
    assert all(batch.tokens.shape == (4, 65) for batch in ranks[1])
    rows = [_kept_rows(ld) for ld in ranks]
    assert rows[0] == _kept_rows(ranks[0])
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(val)  # every sample once, on any number of ranks


def test_eval_loader_split_smaller_than_a_global_batch_pads_with_filler(manifest):
    val = read_split_samples(manifest, "validation")
    ranks = [list(build_eval_loader(_cfg(manifest), 1000, r, 2)) for r in range(2)]
    assert [len(r) for r in ranks] == [1, 1]  # both ranks run one forward pass
    assert int(ranks[0][0].keep.sum()) == len(val) and int(ranks[1][0].keep.sum()) == 0


def test_config_rules():
    with pytest.raises(ValueError, match="one weight per manifest"):
        LoaderConfig(manifests=["a"], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="on_corrupt_shard"):
        LoaderConfig(manifests=["a"], on_corrupt_shard="ignore")


def test_no_manifests_is_a_clear_error():
    with pytest.raises(DataError, match="data.manifests is empty"):
        build_train_loader(LoaderConfig(), 4, 0, 1)


def test_sample_bytes_are_little_endian_tokens(manifest, train_samples):
    arr = np.frombuffer(train_samples[0], dtype="<u2")
    assert len(arr) == 65 and arr.max() < 512


def test_reads_fsspec_and_pipe_urls(manifest, tmp_path):
    reference = _take(build_train_loader(_cfg(manifest), 4, 0, 1), 4)
    via_fsspec = _take(build_train_loader(_cfg(f"file://{manifest}"), 4, 0, 1), 4)
    assert all(torch.equal(x, y) for x, y in zip(reference, via_fsspec, strict=True))
    data = json.loads(Path(manifest).read_text())
    for entries in data["splits"].values():
        for e in entries:
            e["path"] = f"pipe:cat {Path(manifest).parent / e['path']}"
    piped = tmp_path / "manifest.json"
    piped.write_text(json.dumps(data))
    loader = build_train_loader(_cfg(piped), 4, 0, 1)
    assert all(torch.equal(x, y) for x, y in zip(reference, _take(loader, 4), strict=True))


def _rank_share(rank: int, world_size: int, manifest: str) -> list[str]:
    """Runs in a real gloo rank: this rank's samples, gathered to check disjointness."""
    import torch.distributed as dist

    loader = build_train_loader(_cfg(manifest), 4, rank, world_size)
    keys = [_key(row).hex() for batch in _take(loader, 50) for row in batch]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, keys)
    return [k for ks in gathered for k in ks]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_real_ranks_read_disjoint_shares(manifest):
    from tests.harness import run_on_ranks

    results = run_on_ranks(_rank_share, 2, str(manifest))
    assert results[0] == results[1]
    assert len(set(results[0])) == len(results[0]) == 2 * 50 * 4
    single = [_key(row).hex() for batch in _take(build_train_loader(_cfg(manifest), 8, 0, 1), 50)
              for row in batch]
    assert set(results[0]) == set(single)
