"""Reading single token samples by offset, checked, from local files, URLs or ``pipe:`` streams.

Token samples have a fixed size and position inside each tar (:mod:`data_pipeline.shards.tario`),
so a rank reads only its own samples: one ``pread`` of the member's header and data for local
files, fsspec range reads (block cache) for URLs. ``pipe:`` URLs cannot seek; such shards are
streamed whole and cached per worker (documented cost). Sample headers are checked, token ids
are range-checked, and a short, missing or malformed shard raises :class:`ShardError` naming
it, or with ``on_corrupt_shard: skip`` its samples are replaced by another row of the same
batch and counted in ``loader.stats``. No pickle decoder is ever involved.
"""

from __future__ import annotations

import logging
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


def _open_shard(url: str) -> tuple[Any, int]:
    """``(handle, size)``: an fd for local files, an fsspec file for URLs, bytes for ``pipe:``."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as stream:
            data = stream.read()
        return data, len(data)
    if is_url(url):
        import fsspec

        handle = fsspec.open(url, "rb", cache_type="blockcache", block_size=1 << 20).open()
        return handle, handle.size
    fd = os.open(url, os.O_RDONLY)
    return fd, os.fstat(fd).st_size


class ShardReader:
    """Reads single samples of one split's shards by offset; counts bytes; checks headers."""

    def __init__(self, manifest: Manifest, split: str, on_corrupt: str, stats: dict,
                 memory_shards: int = 4) -> None:
        self.m = manifest
        self.memory_shards = memory_shards  # pipe: shards held whole in memory
        self.index = manifest.splits[split]
        self.on_corrupt = on_corrupt
        self.stats = stats
        self.vocab_size = int(manifest.tokenizer["vocab_size"])
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._bad: set[int] = set()

    def close(self) -> None:
        for handle in self._files.values():
            if isinstance(handle, int):
                os.close(handle)
            elif hasattr(handle, "close"):
                handle.close()
        self._files.clear()

    def _fail(self, shard: int, why: str) -> None:
        url = self.index.urls[shard]
        if self.on_corrupt == "skip":
            if shard not in self._bad:
                log.warning("skipping corrupt token shard %s: %s", url, why)
                self._bad.add(shard)
                self.stats["corrupt_shards"].append(url)
            return
        raise ShardError(
            f"token shard {url} is unusable: {why}. Rebuild the shards (launcher/shard.py) or set "
            "data.on_corrupt_shard=skip to skip and count its samples"
        )

    def _open(self, shard: int) -> Any:
        handle = self._files.get(shard)
        if handle is not None:
            self._files.move_to_end(shard)
            return handle
        url = self.index.urls[shard]
        expected = int(self.index.nbytes[shard])
        try:
            handle, size = _open_shard(url)
        except Exception as exc:  # noqa: BLE001 - any backend's failure becomes a ShardError
            self._fail(shard, f"cannot open it ({type(exc).__name__}: {exc})")
            return None
        if isinstance(handle, bytes):
            self.stats["bytes_read"] += size
        if size != expected:
            self._fail(shard, f"it has {size} bytes, the manifest says {expected} (truncated?)")
        self._files[shard] = handle
        in_memory = [k for k, h in self._files.items() if isinstance(h, bytes)]
        if len(self._files) > OPEN_FILES or len(in_memory) > self.memory_shards:
            victim = in_memory[0] if len(in_memory) > self.memory_shards else next(iter(self._files))
            old = self._files.pop(victim)
            if isinstance(old, int):
                os.close(old)
            elif hasattr(old, "close"):
                old.close()
        return handle

    def _read_range(self, handle: Any, start: int, length: int) -> bytes:
        if isinstance(handle, int):
            data = os.pread(handle, length, start)
        elif isinstance(handle, (bytes, bytearray)):
            return bytes(handle[start:start + length])
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
    return {"bytes_read": 0, "skipped_samples": 0, "corrupt_shards": []}


def assemble_batch(rows: list[np.ndarray | None], where: str) -> torch.Tensor:
    """Stack rows into a LongTensor; skipped rows are replaced by the batch's first good row."""
    good = next((r for r in rows if r is not None), None)
    if good is None:
        raise ShardError(f"every sample of {where} came from corrupt shards; rebuild the shards")
    batch = np.stack([good if r is None else r for r in rows]).astype(np.int64)
    return torch.from_numpy(batch)
