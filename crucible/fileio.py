"""Atomic file writes and file checksums, shared by every stage.

A file is written under ``<name>.tmp`` beside its final path and renamed into place only once it
is complete (``os.replace`` is atomic on POSIX within one filesystem), so a crash never leaves a
truncated file under its final name; on an error the temporary file is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: str | Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is deleted.

    For writers that take a file name (``safetensors.save_file``, ``shutil.copyfile``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextmanager
def atomic_open(path: str | Path, fsync: bool = False) -> Iterator[IO[bytes]]:
    """A binary file to write that appears under ``path`` only once it is closed without error.

    ``fsync`` forces the bytes to disk before the rename (for outputs that must survive a crash
    of the machine, not only of the process).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        yield stream
        if fsync:
            stream.flush()
            os.fsync(stream.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
    """``json.dumps(data, indent, sort_keys)`` plus a newline, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (memory stays flat for any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
