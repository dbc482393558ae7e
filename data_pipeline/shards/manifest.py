"""``manifest.json`` of a token-shard set: what exists, without opening a tar.

Layout of the folder::

    manifest.json            written last (its presence marks a complete set)
    train/tokens-000000.tar  webdataset tars; sample key = 12-digit index within the split,
    validation/...           one member ``<key>.tokens`` of (seq_len + 1) little-endian ints

The byte layout of the samples in every tar (:mod:`data_pipeline.shards.tario`) is recorded
under ``sample_layout``; the loader uses it to read only the samples a rank needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crucible.errors import DataError
from data_pipeline.shards.tario import KEY_DIGITS, SHARD_EXT

MANIFEST_FILE = "manifest.json"
FORMAT = "crucible.token-shards/1"
SPLITS = ("train", "validation")


def build_manifest(seq_len: int, dtype: np.dtype, layout: tuple[int, int], tokenizer: dict[str, Any],
                   splits: dict[str, list[dict[str, Any]]], totals: dict[str, Any],
                   shard_config: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a token-shard set; ``layout`` is ``(header_bytes, stride)`` of its tars."""
    header, stride = layout
    return {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "sample_layout": {
            "container": "tar", "key_digits": KEY_DIGITS, "extension": SHARD_EXT,
            "header_bytes": header, "stride": stride,
            "sample_bytes": (seq_len + 1) * dtype.itemsize, "byte_order": "little",
        },
        "tokenizer": tokenizer,
        "splits": splits,
        "shard_config": shard_config,
        "totals": totals,
        "provenance": provenance,
    }


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


class ShardUrls:
    """Shard locations resolved on access (joining 100,000 paths up front costs seconds)."""

    def __init__(self, base: str, paths: list[str]) -> None:
        self.base = base
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return _join(self.base, self.paths[i])

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self.paths)))


@dataclass
class SplitIndex:
    """The shards of one split as arrays (cheap to build for 10,000+ entries)."""

    paths: list[str]
    urls: ShardUrls
    samples: np.ndarray
    tokens: np.ndarray
    nbytes: np.ndarray
    sha256: list[str]
    first_index: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.first_index = np.concatenate([[0], np.cumsum(self.samples)]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return int(self.first_index[-1])


@dataclass
class Manifest:
    """A parsed manifest: the raw dict plus per-split arrays and the file's checksum."""

    location: str
    data: dict[str, Any]
    sha256: str
    splits: dict[str, SplitIndex]

    @property
    def seq_len(self) -> int:
        return int(self.data["seq_len"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"]).newbyteorder("<")

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.data["tokenizer"])

    @property
    def sample_bytes(self) -> int:
        return int(self.data["sample_layout"]["sample_bytes"])

    @property
    def stride(self) -> int:
        return int(self.data["sample_layout"]["stride"])

    @property
    def header_bytes(self) -> int:
        return int(self.data["sample_layout"]["header_bytes"])


def _read_bytes(location: str) -> bytes:
    if is_url(location):
        import fsspec

        try:
            with fsspec.open(location, "rb") as f:
                return f.read()
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read manifest {location}: {exc}") from None
    path = Path(location)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"manifest {path} not found: pass the manifest.json written by launcher/shard.py"
        )
    return path.read_bytes()


def _base_of(location: str) -> str:
    if is_url(location):
        return location.rsplit("/", 1)[0]
    path = Path(location)
    return str(path if path.is_dir() else path.parent)


def _join(base: str, rel: str) -> str:
    if is_url(rel) or rel.startswith("/"):
        return rel
    return posixpath.join(base, rel) if is_url(base) else os.path.join(base, rel)


def parse_manifest(location: str, raw: bytes) -> Manifest:
    """Validate the fields the loader needs; errors name the manifest and the field."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"manifest {location} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"manifest {location}: format is not {FORMAT!r}; rewrite it with launcher/shard.py")
    for key in ("seq_len", "dtype", "tokenizer", "splits", "sample_layout"):
        if key not in data:
            raise DataError(f"manifest {location}: missing field {key!r}")
    base = _base_of(location)
    splits: dict[str, SplitIndex] = {}
    for name, entries in data["splits"].items():
        try:
            paths = [e["path"] for e in entries]
            splits[name] = SplitIndex(
                paths=paths,
                urls=ShardUrls(base, paths),
                samples=np.array([e["samples"] for e in entries], dtype=np.int64),
                tokens=np.array([e["tokens"] for e in entries], dtype=np.int64),
                nbytes=np.array([e["bytes"] for e in entries], dtype=np.int64),
                sha256=[e["sha256"] for e in entries],
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"manifest {location}: bad shard entry in split {name!r}: {exc}") from None
    return Manifest(location, data, hashlib.sha256(raw).hexdigest(), splits)


def load_manifest(location: str | Path) -> Manifest:
    """Read a manifest from a local path (file or folder) or an fsspec URL."""
    location = str(location)
    return parse_manifest(location, _read_bytes(location))

