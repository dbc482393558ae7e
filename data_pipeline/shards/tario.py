"""Tar IO of token shards: member names, the fixed byte layout of samples, writing a shard.

A token shard holds one member ``<key>.tokens`` per sample, ``<key>`` its 12-digit index within
the split, all of the same size. Written with the deterministic tar writer of the clean shards
(:func:`data_pipeline.clean.output.atomic_tar_writer`: fixed metadata, so every member carries
the same small pax header), the data of sample ``i`` of a shard starts at byte
``header_bytes + i * stride``; :func:`write_token_tar` measures and checks that, and the loader
relies on it to read only the samples a rank needs.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from data_pipeline.clean.output import atomic_tar_writer

TAR_BLOCK = 512
KEY_DIGITS = 12
SHARD_EXT = "tokens"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def member_name(index: int) -> str:
    """Name of the tar member holding sample ``index`` of a split."""
    return f"{sample_key(index)}.{SHARD_EXT}"


def tar_stride(sample_bytes: int, header_bytes: int = TAR_BLOCK) -> int:
    """Bytes per tar member: its header blocks plus the data padded to whole blocks."""
    return header_bytes + -(-sample_bytes // TAR_BLOCK) * TAR_BLOCK


def measure_layout(path: Path, samples: int, sample_bytes: int, first_index: int) -> tuple[int, int]:
    """``(header_bytes, stride)`` such that member ``i`` starts at ``header_bytes + i * stride``.

    Raises if the tar does not have that fixed layout (the loader's random access relies on it).
    """
    offsets = []
    with tarfile.open(path, "r:") as tf:
        for i, member in enumerate(tf):
            if member.name != member_name(first_index + i) or member.size != sample_bytes:
                raise RuntimeError(f"{path}: unexpected member {i}: {member.name} ({member.size} bytes)")
            offsets.append(member.offset_data)
    if len(offsets) != samples:
        raise RuntimeError(f"{path}: wrote {len(offsets)} members, expected {samples}")
    header = offsets[0]
    stride = offsets[1] - offsets[0] if len(offsets) > 1 else tar_stride(sample_bytes, header)
    if any(off != header + i * stride for i, off in enumerate(offsets)):
        raise RuntimeError(f"{path}: members are not evenly spaced")
    return header, stride


def write_token_tar(path: Path, samples: np.ndarray, first_index: int) -> tuple[int, int]:
    """Write ``samples`` (one row per sample) as a token shard; returns its measured layout."""
    with atomic_tar_writer(path) as writer:
        for i, row in enumerate(samples):
            writer.write({"__key__": sample_key(first_index + i), SHARD_EXT: row.tobytes()})
    return measure_layout(path, len(samples), samples.shape[1] * samples.dtype.itemsize, first_index)
