"""Reading single token samples by offset, checked, from local files, URLs or ``pipe:`` streams.

Token samples have a fixed size and position inside each tar (:mod:`data_pipeline.shards.tario`),
so a rank reads only its own samples: one ``pread`` of the member's header and data for local
files, fsspec range reads (block cache) for URLs. ``pipe:`` URLs cannot seek; such shards are
streamed whole and cached per worker (documented cost). Sample headers are checked, token ids
are range-checked, and a short, missing or malformed shard raises :class:`ShardError` naming
it, or with ``on_corrupt_shard: skip`` its samples are replaced by another row of the same
batch and counted in ``loader.stats``. No pickle decoder is ever involved.

Checksums (``verify_checksums``, on by default). A reader reads its samples in shuffled order,
a fraction of each shard per rank, so a shard's sha256 cannot be folded into those reads; and a
mismatch is only known once every byte has been hashed. So a shard is verified *whole, when the
reader first opens it, before any of its samples is handed out*, and its samples are then served
from the very bytes that were hashed: a local shard is memory-mapped and hashed through the map
(its bytes come from the disk once; samples are slices of the same pages), a URL or ``pipe:``
shard is fetched whole while it is hashed and kept in memory (at most ``memory_shards``). This
holds wherever the reader starts: a resume into the middle of a shard, or a shuffle window that
needs one sample of it, still hashes the whole file first, so no sample of a shard whose bytes
differ from the manifest is ever yielded (under ``error`` the batch that first needs it raises;
under ``skip`` all of its samples are replaced and counted). A local shard is hashed once per
reader; a reopened one is hashed again only when its inode, size or mtime changed.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from crucible.errors import DataError
from data_pipeline.shards.manifest import Manifest, is_url
from data_pipeline.shards.tario import TAR_BLOCK, member_name

log = logging.getLogger("crucible.loader")

OPEN_FILES = 64


class ShardError(DataError):
    """A token shard is missing, truncated or corrupt."""


READ_CHUNK = 1 << 22


def _read_whole(stream: Any) -> tuple[bytes, str]:
    """Everything ``stream`` holds and its sha256, hashed chunk by chunk as it arrives."""
    h = hashlib.sha256()
    data = bytearray()
    while chunk := stream.read(READ_CHUNK):
        h.update(chunk)
        data += chunk
    return bytes(data), h.hexdigest()


def _open_shard(url: str, whole: bool) -> tuple[Any, int, str | None]:
    """``(handle, size, sha256)``. Without ``whole``: an fd for local files, an fsspec file for
    URLs (sha256 None); with it (verification): a read-only mmap for local files, the bytes for
    URLs, and the sha256 of those bytes. ``pipe:`` shards are always read whole and hashed."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as stream:
            data, digest = _read_whole(stream)
        return data, len(data), digest
    if is_url(url):
        import fsspec

        if whole:
            with fsspec.open(url, "rb") as stream:
                data, digest = _read_whole(stream)
            return data, len(data), digest
        handle = fsspec.open(url, "rb", cache_type="blockcache", block_size=1 << 20).open()
        return handle, handle.size, None
    fd = os.open(url, os.O_RDONLY)
    return fd, os.fstat(fd).st_size, None


def _close(handle: Any) -> None:
    if isinstance(handle, int):
        os.close(handle)
    elif hasattr(handle, "close"):
        handle.close()


def _file_identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ShardReader:
    """Reads single samples of one split's shards by offset; counts bytes; checks headers and,
    with ``verify``, each shard's size and sha256 against the manifest before its first sample
    (see the module docstring)."""

    def __init__(self, manifest: Manifest, split: str, on_corrupt: str, stats: dict,
                 memory_shards: int = 4, verify: bool = True) -> None:
        self.m = manifest
        self.memory_shards = memory_shards  # pipe: (and verified URL) shards held whole in memory
        self.index = manifest.splits[split]
        self.on_corrupt = on_corrupt
        self.stats = stats
        self.verify = verify
        self.vocab_size = int(manifest.tokenizer["vocab_size"])
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._bad: set[int] = set()
        self._verified: dict[int, tuple[int, int, int, int]] = {}  # local shard -> file identity

    def close(self) -> None:
        for handle in self._files.values():
            _close(handle)
        self._files.clear()

    def _fail(self, shard: int, why: str) -> None:
        url = self.index.urls[shard]
        if self.on_corrupt == "skip":
            if shard not in self._bad:
                log.warning("skipping corrupt token shard %s: %s; all its samples are replaced by "
                            "other rows of their batch and counted (data/skipped_samples)", url, why)
                self._bad.add(shard)
                self.stats["corrupt_shards"].append(url)
            return
        raise ShardError(
            f"token shard {url} is unusable: {why}. Check the whole set with `python "
            f"launcher/shard.py --verify {self.m.location}`, then restore the file or rebuild the "
            "shards (launcher/shard.py); or set data.on_corrupt_shard=skip to replace and count "
            "its samples"
        )

    def _open_checked(self, shard: int) -> Any:
        """Open ``shard``; its size, and with ``verify`` its sha256, checked (None: unusable)."""
        url = self.index.urls[shard]
        expected = int(self.index.nbytes[shard])
        try:
            handle, size, digest = _open_shard(url, whole=self.verify)
            if size == expected and self.verify and isinstance(handle, int):
                handle, digest = self._map_and_hash(shard, handle, size)
        except Exception as exc:  # noqa: BLE001 - any backend's failure becomes a ShardError
            self._fail(shard, f"cannot open it ({type(exc).__name__}: {exc})")
            return None
        if isinstance(handle, bytes):
            self.stats["bytes_read"] += size
        if size != expected:
            _close(handle)
            self._fail(shard, f"it has {size} bytes, the manifest says {expected} (truncated?)")
            return None
        if self.verify and digest is not None:
            self.stats["verified_shards"] += 1
            self.stats["verified_bytes"] += size
            if digest != self.index.sha256[shard]:
                _close(handle)
                self._fail(shard, f"its sha256 is {digest} but manifest {self.m.location} says "
                                  f"{self.index.sha256[shard]} (same size: its bytes changed "
                                  "after it was written)")
                return None
        return handle

    def _map_and_hash(self, shard: int, fd: int, size: int) -> tuple[Any, str | None]:
        """A read-only map of a local shard and its sha256 (None: this reader already verified
        the same unchanged file); the fd is closed either way."""
        try:
            identity = _file_identity(fd)
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
        finally:
            os.close(fd)
        if self._verified.get(shard) == identity:
            return mapped, None
        digest = hashlib.sha256(mapped).hexdigest()  # reads the file once, through the map
        self.stats["bytes_read"] += size
        if digest == self.index.sha256[shard]:
            self._verified[shard] = identity
        return mapped, digest

    def _open(self, shard: int) -> Any:
        handle = self._files.get(shard)
        if handle is not None:
            self._files.move_to_end(shard)
            return handle
        handle = self._open_checked(shard)
        if handle is None:
            return None
        self._files[shard] = handle
        in_memory = [k for k, h in self._files.items() if isinstance(h, bytes)]
        if len(self._files) > OPEN_FILES or len(in_memory) > self.memory_shards:
            victim = in_memory[0] if len(in_memory) > self.memory_shards else next(iter(self._files))
            _close(self._files.pop(victim))
        return handle

    def _read_range(self, handle: Any, start: int, length: int) -> bytes:
        if isinstance(handle, int):
            data = os.pread(handle, length, start)
        elif isinstance(handle, bytes):
            return handle[start:start + length]
        elif isinstance(handle, mmap.mmap):
            return handle[start:start + length]  # pages counted when hashed at open
        else:
            handle.seek(start)
            data = handle.read(length)
        self.stats["bytes_read"] += len(data)
        return data

    def read(self, shard: int, local: int) -> np.ndarray | None:
        """Tokens of sample ``local`` of ``shard`` (``None`` when skipped as corrupt)."""
        if shard in self._bad:
            self.stats["skipped_samples"] += 1
            return None
        handle = self._open(shard)
        if handle is None or shard in self._bad:
            self.stats["skipped_samples"] += 1
            return None
        m = self.m
        start = local * m.stride
        length = m.header_bytes + m.sample_bytes
        data = self._read_range(handle, start, length)
        name = member_name(int(self.index.first_index[shard]) + local).encode()
        header = data[m.header_bytes - TAR_BLOCK:m.header_bytes]
        problem = None
        if len(data) != length:
            problem = f"sample {local} is cut short at byte {start + len(data)}"
        elif not header.startswith(name + b"\0"):
            problem = f"sample {local} has a bad tar header (expected member {name.decode()})"
        if problem is None:
            tokens = np.frombuffer(data, dtype=m.dtype, offset=m.header_bytes)
            if int(tokens.max()) >= self.vocab_size:
                problem = f"sample {local} holds token ids >= vocab size {self.vocab_size}"
        if problem is not None:
            self._fail(shard, problem)
            self.stats["skipped_samples"] += 1
            return None
        return tokens


def new_stats() -> dict:
    """The loader's counters: bytes read from shards, samples replaced because their shard was
    unusable, the unusable shards, and the shards (and bytes) whose sha256 was checked."""
    return {"bytes_read": 0, "skipped_samples": 0, "corrupt_shards": [], "verified_shards": 0,
            "verified_bytes": 0}


def take_stats(stats: dict) -> dict:
    """A copy of ``stats``, which is reset: what a DataLoader worker sends with each batch."""
    delta = {k: list(v) if isinstance(v, list) else v for k, v in stats.items()}
    for k, v in stats.items():
        if isinstance(v, list):
            v.clear()
        else:
            stats[k] = 0
    return delta


def add_stats(stats: dict, delta: dict) -> None:
    """Add a worker's ``delta`` (:func:`take_stats`) to ``stats``; shards are listed once."""
    for k, v in delta.items():
        if isinstance(v, list):
            stats[k].extend(u for u in v if u not in stats[k])
        else:
            stats[k] += v


def assemble_batch(rows: list[np.ndarray | None], where: str) -> torch.Tensor:
    """Stack rows into a LongTensor; skipped rows are replaced by the batch's first good row."""
    good = next((r for r in rows if r is not None), None)
    if good is None:
        raise ShardError(f"every sample of {where} came from corrupt shards; rebuild the shards")
    batch = np.stack([good if r is None else r for r in rows]).astype(np.int64)
    return torch.from_numpy(batch)
