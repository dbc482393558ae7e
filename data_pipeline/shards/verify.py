"""Checking token-shard sets against their manifests: every shard's size and sha256.

``launcher/shard.py --verify`` runs this over one or more manifests (local paths, fsspec URLs or
``pipe:`` shards). Each shard is read once, in 4 MiB chunks hashed as they arrive (flat memory);
shards are checked in parallel threads (file reads and hashlib's sha256 release the GIL), and a
shard whose size already differs is reported without being read. The training loader checks the
same two things for the shards it opens (``data.verify_checksums``); this checks a whole set
before a run, after a copy or sync, or when a run reported a corrupt shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.shards.manifest import Manifest, is_url, load_manifest

CHUNK = 1 << 22


@dataclass(frozen=True)
class ShardCheck:
    """The result for one shard: ``problem`` is None when size and sha256 match the manifest."""

    manifest: str
    split: str
    path: str
    url: str
    expected_bytes: int
    expected_sha256: str
    actual_bytes: int | None
    actual_sha256: str | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _open_stream(url: str) -> Any:
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _hash_stream(url: str) -> tuple[int, str]:
    """``(bytes, sha256)`` of a shard, read once in chunks."""
    h = hashlib.sha256()
    size = 0
    with _open_stream(url) as stream:
        while chunk := stream.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def check_shard(manifest: str, split: str, path: str, url: str, expected_bytes: int,
                expected_sha256: str) -> ShardCheck:
    """Size and sha256 of one shard against its manifest entry."""
    def result(size: int | None, digest: str | None, problem: str | None) -> ShardCheck:
        return ShardCheck(manifest, split, path, url, expected_bytes, expected_sha256, size, digest,
                          problem)

    if not is_url(url):
        try:
            size = os.stat(url).st_size
        except FileNotFoundError:
            return result(None, None, "missing")
        except OSError as exc:
            return result(None, None, f"cannot read it ({exc})")
        if size != expected_bytes:
            return result(size, None, f"has {size} bytes, the manifest says {expected_bytes} "
                                      "(truncated, or replaced by another file)")
    try:
        size, digest = _hash_stream(url)
    except FileNotFoundError:
        return result(None, None, "missing")
    except Exception as exc:  # noqa: BLE001 - any backend's failure is reported for this shard
        return result(None, None, f"cannot read it ({type(exc).__name__}: {exc})")
    if size != expected_bytes:
        return result(size, digest, f"has {size} bytes, the manifest says {expected_bytes} "
                                    "(truncated, or replaced by another file)")
    if digest != expected_sha256:
        return result(size, digest, f"sha256 is {digest} but the manifest says {expected_sha256} "
                                    "(same size: its bytes changed after it was written)")
    return result(size, digest, None)


def verify_manifests(manifests: Sequence[str | Path | Manifest],
                     threads: int | None = None) -> list[ShardCheck]:
    """Check every shard of every split of ``manifests``; results in manifest order.

    ``threads``: shards hashed at once (default: the CPU count, at most 32). A missing or
    unreadable manifest raises :class:`~crucible.errors.DataError`.
    """
    loaded = [m if isinstance(m, Manifest) else load_manifest(m) for m in manifests]
    jobs = [(m.location, split, index.paths[i], index.urls[i], int(index.nbytes[i]),
             index.sha256[i])
            for m in loaded for split, index in m.splits.items() for i in range(len(index.paths))]
    threads = threads or min(32, os.cpu_count() or 1)
    if threads <= 1 or len(jobs) <= 1:
        return [check_shard(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify-shards") as pool:
        return list(pool.map(lambda job: check_shard(*job), jobs))
