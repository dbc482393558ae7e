"""Loader throughput beside a plain webdataset pipeline, the cost of checksum verification,
and startup time vs. manifest size.

    python bench/loader.py --text ../shared/data/news/bbc --mb 10
    python bench/loader.py --manifest runs/sample/shards/manifest.json

Throughput: samples per second of ``build_train_loader`` (shuffled, resumable, reading only this
rank's samples, sha256 verification on as by default) beside ``wds.WebDataset(shards)
.shuffle(1000)`` decoding the same ``.tokens`` members into the same LongTensor batches, in the
same process, alternating, best of ``--repeats``.

Verification: one epoch of rank 0's batches from a fresh loader (so every shard is opened, and
with ``data.verify_checksums`` hashed, once; the timed span includes the first batch) with
verification on beside off, alternating, best of ``--repeats``, as 1 rank and as rank 0 of
``--world-size`` ranks (each rank hashes every shard it opens but reads only its share of the
samples, so the relative cost grows with the rank count). The shards are in the page cache.

Startup: ``build_train_loader`` plus locating the first sample, on manifests with 100, 10,000 and
100,000 shard entries (target: under 1 s for 10,000, flat in shard count).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch


def build_manifest(text: Path, mb: float, work: Path, seq_len: int) -> Path:
    import shard as shard_bench  # bench/shard.py

    from data_pipeline.shards.config import ShardConfig
    from data_pipeline.shards.writer import write_token_shards

    texts = shard_bench.corpus(text, mb)
    tok = shard_bench.ensure_tokenizer(texts, None, work, 8000)
    write_token_shards(texts, tok, work / "shards",
                       ShardConfig(seq_len=seq_len, samples_per_shard=256, validation_fraction=0.0))
    return work / "shards" / "manifest.json"


def time_ours(manifest: Path, batch: int, n_batches: int, workers: int) -> float:
    from data_pipeline.loader.config import LoaderConfig
    from data_pipeline.loader.train import build_train_loader

    loader = build_train_loader(LoaderConfig(manifests=[str(manifest)], num_workers=workers), batch, 0, 1)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    seconds = time.perf_counter() - start
    loader.close()
    return n_batches * batch / seconds


def time_epoch(manifest: Path, batch: int, world_size: int, verify: bool) -> tuple[float, int]:
    """Samples/s of one epoch of rank 0's batches from a fresh loader, first batch included;
    and the shards it hashed."""
    from data_pipeline.loader.config import LoaderConfig
    from data_pipeline.loader.train import build_train_loader

    start = time.perf_counter()
    loader = build_train_loader(LoaderConfig(manifests=[str(manifest)], verify_checksums=verify),
                                batch, 0, world_size)
    n_batches = loader.epoch_batches()
    it = iter(loader)
    for _ in range(n_batches):
        next(it)
    seconds = time.perf_counter() - start
    loader.close()
    return n_batches * batch / seconds, loader.stats["verified_shards"]


def time_webdataset(manifest: Path, batch: int, n_batches: int) -> float:
    import webdataset as wds

    data = json.loads(manifest.read_text())
    urls = [str(manifest.parent / e["path"]) for e in data["splits"]["train"]]
    dtype = np.dtype(data["dtype"]).newbyteorder("<")

    def to_batch(rows):
        return torch.from_numpy(np.stack([np.frombuffer(r, dtype=dtype) for r in rows]).astype(np.int64))

    pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()
                .shuffle(1000, rng=__import__("random").Random(0))
                .to_tuple("tokens").map(lambda t: t[0]).batched(batch, collation_fn=to_batch))
    it = iter(pipeline)
    next(it)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - start)


def time_startup(manifest: Path, entries: int, work: Path) -> float:
    from data_pipeline.loader.config import LoaderConfig
    from data_pipeline.loader.order import EpochOrder
    from data_pipeline.loader.train import build_train_loader

    data = json.loads(manifest.read_text())
    real = data["splits"]["train"]
    big = copy.deepcopy(data)
    big["splits"]["train"] = [dict(real[i % len(real)], path=f"train/tokens-{i:06d}.tar")
                              for i in range(entries)]
    path = work / f"manifest-{entries}.json"
    path.write_text(json.dumps(big))
    start = time.perf_counter()
    loader = build_train_loader(LoaderConfig(manifests=[str(path)]), 8, 0, 1)
    EpochOrder(loader.sources[0].index, 1234, 0, 0, 4).locate(0)  # first sample's location
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "news" / "bbc",
                    help="folder of news text (default: ../shared/data/news/bbc beside the checkout)")
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--world-size", type=int, default=8,
                    help="verification cost also measured as rank 0 of this many ranks")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = args.manifest or build_manifest(args.text, args.mb, work, args.seq_len)
        data = json.loads(manifest.read_text())
        ours, plain = [], []
        for _ in range(args.repeats):
            ours.append(time_ours(manifest, args.batch, args.batches, args.workers))
            plain.append(time_webdataset(manifest, args.batch, args.batches))
        verification = {}
        for world in sorted({1, args.world_size}):
            on, off, hashed = [], [], 0
            for _ in range(max(args.repeats, 3)):
                rate, hashed = time_epoch(manifest, args.batch, world, True)
                on.append(rate)
                off.append(time_epoch(manifest, args.batch, world, False)[0])
            verification[world] = (max(on), max(off), hashed)
        startup = {n: time_startup(manifest, n, work) for n in (100, 10_000, 100_000)}
    print(f"shards: {len(data['splits']['train'])}, samples of {data['seq_len'] + 1} {data['dtype']}, "
          f"batch {args.batch}, {args.batches} batches, loader workers {args.workers}")
    print(f"loader (ours):           {max(ours):10.0f} samples/s")
    print(f"plain webdataset:        {max(plain):10.0f} samples/s")
    print(f"ratio ours / webdataset: {max(ours) / max(plain):10.2f}x")
    size_mb = sum(e["bytes"] for e in data["splits"]["train"]) / 1e6
    for world, (on, off, hashed) in verification.items():
        print(f"one epoch of rank 0 of {world} ({hashed} shards, {size_mb:.1f} MB hashed): "
              f"sha256 verification on {on:10.0f} samples/s, off {off:10.0f} samples/s: "
              f"on / off {on / off:5.2f}x")
    for n, t in startup.items():
        print(f"startup, {n:>7,} shard entries: {t * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
