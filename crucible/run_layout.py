"""What a run directory records about itself, so that it can be moved, copied or synced to
another machine and still mean itself, and so that a reader can tell a whole checkpoint from a
damaged one before loading anything.

Two rules:

- Every path a run directory stores about its own contents (``latest.json``) is relative to the
  directory that holds the record, and readers resolve it against the directory they were given.
  Older run directories stored absolute paths; such a path counts only when it lies inside the
  given directory (:func:`resolve_record`), so a moved directory never resolves to whatever now
  sits at its old place.
- A checkpoint's completion marker (``COMPLETE.json``) lists every file of the checkpoint with
  its size at save time (:func:`file_inventory`); a file lost, truncated or emptied later (a copy
  or sync cut short, a full disk) is found by comparing sizes (:func:`inventory_problem`), and
  a changed byte inside a ``torch.save`` file by its zip CRCs (:func:`zip_problem`).

The checkpoint layout itself (what a step directory holds) belongs to
:mod:`training.checkpoint`; the names here are the ones readers outside training need.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
LATEST = "latest.json"
MODEL_DIR = "model"
# The non-weight files of the model directory (config, tokenizer, provenance, task.json), written
# by rank 0 at every save; consolidation copies them beside the weights into MODEL_DIR.
MODEL_FILES = "model_files"
TAG_RE = re.compile(r"^step_(\d{8,})$")
# files that are not part of what a save wrote: an atomic write's leftover, a later conversion
_NOT_SAVED_SUFFIXES = (".tmp",)


def resolve_record(base: str | Path, recorded: str) -> Path | None:
    """The path a record inside ``base`` means: a relative one under ``base``; an absolute one
    (written by older versions) only if it lies inside ``base``. None for anything else (an
    absolute path elsewhere: the directory was moved or copied since, and that path now belongs
    to another run, or to none)."""
    base = Path(base)
    path = Path(recorded)
    if path.is_absolute():
        try:
            return base / path.resolve().relative_to(base.resolve())
        except ValueError:
            return None
    resolved = base / path
    try:
        resolved.resolve().relative_to(base.resolve())
    except ValueError:  # '..' leading out of the directory
        return None
    return resolved


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named ``step_NNNNNNNN``, else None."""
    match = TAG_RE.match(path.name)
    return int(match.group(1)) if match else None


def marked_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run that hold a completion marker, readable or not, newest
    first (one without a marker is a save that never finished)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def read_record(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from ``path``, or None and a one-line reason naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path} cannot be read ({exc})"
    except ValueError:
        size = path.stat().st_size
        return None, f"{path} is not valid JSON ({'empty' if size == 0 else f'{size} bytes, truncated or overwritten?'})"
    if not isinstance(data, dict):
        return None, f"{path} does not hold a JSON object"
    return data, None


def file_inventory(directory: str | Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, int]:
    """``{relative posix path: size in bytes}`` of every file below ``directory`` (sorted),
    except those whose relative path ``skip`` accepts and leftover temporary files."""
    directory = Path(directory)
    out: dict[str, int] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.endswith(_NOT_SAVED_SUFFIXES):
            continue
        rel = path.relative_to(directory).as_posix()
        if not skip(rel):
            out[rel] = path.stat().st_size
    return out


def inventory_problem(directory: str | Path, inventory: Mapping[str, Any],
                      select: Callable[[str], bool] = lambda name: True) -> str | None:
    """The first file of ``inventory`` (those ``select`` accepts) that is missing below
    ``directory`` or has another size than recorded, as one line naming it; None if all match."""
    directory = Path(directory)
    for rel, size in sorted(inventory.items()):
        if not select(rel):
            continue
        path = resolve_record(directory, rel)
        if path is None or not isinstance(size, int):
            return f"{directory / MARKER} lists an invalid entry {rel!r}"
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError as exc:
            return f"{path} cannot be read ({exc})"
        if actual != size:
            return f"{path} has {actual} bytes, {size} were saved"
    return None


def zip_problem(path: str | Path) -> str | None:
    """Whether a ``torch.save`` file (a zip archive with a CRC per record) is whole: reads it
    once and checks every CRC, without unpickling anything. ``torch.load`` itself checks no
    CRC, so a changed byte would otherwise load silently. Files in another format are not
    judged (None)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None if path.stat().st_size else f"{path} is empty"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"{path} is damaged ({exc})"
    return f"{path} is damaged (record {bad} fails its CRC check)" if bad else None
