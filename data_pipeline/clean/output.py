"""The clean-shard format: what the cleaning stage writes and every later stage reads.

A finished output folder holds ``docs-NNNNNN.tar`` (webdataset tars; each sample is one
document: ``<key>.txt`` its text, ``<key>.json`` its id, source, url, language and metadata),
optionally ``rejected/rejected-NNNNNN.tar`` (the same plus the drop ``reason``),
``stats.json``, ``config.yaml``, ``provenance.json`` and, written last, ``_SUCCESS``.

Tars are deterministic (fixed mtime, owner and mode on every member, no encoder and never
pickle), so the same samples always give the same bytes, and atomic (written under a
temporary name and renamed once complete). Token shards are written with the same tar writer.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import tarfile_to_samples

from crucible.errors import DataError
from crucible.fileio import atomic_open, atomic_write_text
from data_pipeline.clean.work import WORK

SUCCESS = "_SUCCESS"
STATS_FILE = "stats.json"
DOCS = "docs"
REJECTED = "rejected"
CLEAN_PATTERN = f"{DOCS}-*.tar"
FIXED_MTIME = 0.0


def is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished cleaning run (its ``_SUCCESS`` marker exists)."""
    return (Path(out_dir) / SUCCESS).is_file()


def mark_complete(out_dir: str | Path) -> None:
    atomic_write_text(Path(out_dir) / SUCCESS, "")


# ---------------------------------------------------------------- writing


@contextmanager
def atomic_tar_writer(path: str | Path) -> Iterator[wds.TarWriter]:
    """Yield a ``TarWriter`` whose tar appears under ``path`` (fsynced) once complete; on an
    error nothing is left behind.

    Samples are dicts ``{"__key__": str, "<ext>": bytes | str, ...}``; pass bytes (or str for
    ``.txt``/``.json``) so no encoder (and never pickle) is involved.
    """
    with atomic_open(path, fsync=True) as stream:
        writer = wds.TarWriter(stream, user="crucible", group="crucible", mode=0o444,
                               mtime=FIXED_MTIME, encoder=False)
        try:
            yield writer
        finally:
            writer.close()


class CleanShardWriter:
    """Writes documents into ``<prefix>-NNNNNN.tar`` files of about ``shard_bytes`` each."""

    def __init__(self, out: Path, prefix: str, shard_bytes: int) -> None:
        self.out, self.prefix, self.shard_bytes = out, prefix, shard_bytes
        self.stack = ExitStack()
        self.writer: wds.TarWriter | None = None
        self.shard = -1
        self.size = 0
        self.count = 0

    def _open(self) -> None:
        self.stack.close()
        self.shard += 1
        self.writer = self.stack.enter_context(
            atomic_tar_writer(self.out / f"{self.prefix}-{self.shard:06d}.tar"))
        self.size = 0

    def write(self, record: dict[str, Any]) -> None:
        """One document: ``text`` goes to ``.txt`` (removed from ``record``), the rest to ``.json``."""
        if self.writer is None or self.size >= self.shard_bytes:
            self._open()
        text = record.pop("text").encode("utf-8")
        meta = json.dumps(record, sort_keys=True, default=str).encode("utf-8")
        self.writer.write({"__key__": f"{self.count:010d}", "txt": text, "json": meta})
        self.size += len(text) + len(meta) + 1536  # tar headers and padding, roughly
        self.count += 1

    def close(self, at_least_one: bool) -> int:
        """Finish the last shard; returns the number of shards (``at_least_one``: an empty one
        when no document was written)."""
        if self.writer is None and at_least_one:
            self._open()
        self.stack.close()
        return self.shard + 1


# ---------------------------------------------------------------- reading


def clean_shard_paths(input_dir: str | Path, require_success: bool = True) -> list[Path]:
    """The ``docs-NNNNNN.tar`` of a finished cleaning run, in order.

    A folder that is not a finished cleaning output is refused with what it is instead: never a
    cleaning output (raw files: clean them first), or a cleaning run that did not finish (rerun it).
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise DataError(f"clean shard folder {folder} does not exist (run launcher/clean.py first)")
    paths = sorted(folder.glob(CLEAN_PATTERN))
    if require_success and not is_complete(folder):
        if not paths and not (folder / WORK).is_dir() and not (folder / STATS_FILE).is_file():
            raise DataError(not_clean_output(folder))
        raise DataError(
            f"{folder} has no {SUCCESS} marker: the cleaning run that writes it did not finish "
            f"(it was stopped or failed); rerun the same launcher/clean.py command, which keeps the "
            f"inputs it finished, then pass input={folder} again"
        )
    if not paths:
        raise DataError(f"{folder} holds no {CLEAN_PATTERN} shards")
    return paths


def not_clean_output(folder: Path) -> str:
    """Why ``folder`` (no clean shards, no ``_work/``, no ``stats.json``) is not a cleaning output,
    with the command that makes one from it."""
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    holds = f"it holds {shown}" if names else "it is empty"
    return (
        f"{folder} is not the output of a cleaning run (no {CLEAN_PATTERN}, {STATS_FILE} or {SUCCESS}; "
        f"{holds}): input= expects the output folder of launcher/clean.py. Clean raw files first: "
        f"python launcher/clean.py input={folder} output=<clean folder>, then pass input=<clean folder> "
        "(or run launcher/prepare_data.py, which cleans, trains the tokenizer and writes the shards in one go)"
    )


def iter_clean_documents(input_dir: str | Path, require_success: bool = True) -> Iterator[dict]:
    """Documents of a clean shard folder in order: ``{"id", "text", "source", ...}``."""
    for path in clean_shard_paths(input_dir, require_success):
        yield from iter_shard_documents(path)


def iter_shard_documents(path: str | Path) -> Iterator[dict]:
    """Documents of one clean ``docs-NNNNNN.tar`` in order."""
    try:
        for sample in tarfile_to_samples()([{"url": str(path)}]):
            if "txt" not in sample:
                raise DataError(f"{path}: sample {sample.get('__key__')!r} has no .txt member")
            meta = json.loads(sample["json"]) if "json" in sample else {}
            meta["text"] = sample["txt"].decode("utf-8")
            meta.setdefault("id", sample["__key__"])
            yield meta
    except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"clean shard {path} is unreadable: {exc}") from None
