"""Deterministic, atomic webdataset tar writing shared by every stage that writes shards.

webdataset's ``TarWriter`` stamps members with the current time unless told otherwise; here
every member gets a fixed mtime, owner and mode, so the same samples always give the same
bytes. A shard is written to ``<name>.tmp`` and renamed into place only when complete, so a
crash never leaves a truncated shard under its final name.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import webdataset as wds

FIXED_MTIME = 0.0


@contextmanager
def atomic_tar_writer(path: str | Path) -> Iterator[wds.TarWriter]:
    """Yield a ``TarWriter`` over ``path.tmp``; rename to ``path`` on success, delete on error.

    Samples are dicts ``{"__key__": str, "<ext>": bytes | str, ...}``; pass bytes (or str for
    ``.txt``/``.json``) so no encoder (and never pickle) is involved.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, user="crucible", group="crucible", mode=0o444,
                               mtime=FIXED_MTIME, encoder=False)
        try:
            yield writer
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        except BaseException:
            writer.close()
            stream.close()
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
