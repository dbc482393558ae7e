"""The intermediate files of one input in a cleaning run's ``_work/`` folder.

Phase 1 writes, per input: kept documents (zstd JSON lines), rejected ones (when asked for),
exact hashes and MinHash signatures (raw fixed-width rows) and, last, ``NNNNNN.done.json``
with the input's stats. Each file appears under its name only once complete.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from crucible.fileio import atomic_open

WORK = "_work"


class InputWork:
    """Paths of one input's intermediate files."""

    def __init__(self, work: Path, index: int) -> None:
        stem = work / f"{index:06d}"
        self.docs = stem.with_suffix(".docs.jsonl.zst")
        self.rejected = stem.with_suffix(".rejected.jsonl.zst")
        self.exact = stem.with_suffix(".exact.u64")
        self.sig = stem.with_suffix(".sig.u32")
        self.done = stem.with_suffix(".done.json")


@contextmanager
def zstd_json_lines(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """``write(record)``: appends JSON lines to a zstd stream (memory stays flat)."""
    with atomic_open(path) as f, zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False) as z:
        yield lambda record: z.write(json.dumps(record, sort_keys=True, default=str).encode("utf-8") + b"\n")


@contextmanager
def row_file(path: Path, dtype: type) -> Iterator[Callable[[Any], None]]:
    """``append(row)``: appends fixed-width rows (exact hashes, signatures) to a raw binary file."""
    with atomic_open(path) as f:
        yield lambda row: f.write(np.asarray(row, dtype=dtype).tobytes())


def read_zstd_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in reader:
            yield json.loads(line)
