"""The evaluation loader: each source's validation split on its own, finite and unshuffled, shared
out over the ranks so that what is evaluated does not depend on the number of ranks."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np
import torch

from crucible.errors import DataError
from data_pipeline.loader.base import LoaderBase
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.reading import ShardReader
from data_pipeline.shards.manifest import MANIFEST_FILE, is_url


def source_name(location: str) -> str:
    """A short name for the token-shard set at ``location`` (a manifest path or URL): its folder's
    name, or the folder above when that is ``shards`` (``runs/web/shards/manifest.json`` ->
    ``web``), with characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    path = PurePosixPath((urlsplit(location).path if is_url(location) else location).replace("\\", "/"))
    if path.name == MANIFEST_FILE or path.suffix == ".json":
        path = path.parent
    if path.name == "shards" and path.parent.name:
        path = path.parent
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.name).strip("_") or "source"


def source_names(manifests: list[str]) -> list[str]:
    """One name per manifest (:func:`source_name`), made unique in manifest order: a name taken
    already gets ``_2``, ``_3``, ... The names are the ``<source>`` of ``val/<source>/loss``, so
    they stay the same as long as the list of manifests does."""
    taken: set[str] = set()
    names = []
    for location in manifests:
        base = name = source_name(str(location))
        n = 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names.append(name)
    return names


def share_evenly(total: int, sizes: list[int]) -> list[int]:
    """``total`` samples shared evenly over sources of ``sizes`` samples (the first
    ``total % len(sizes)`` sources take one more), each capped at its size; what a small source
    cannot give is not moved to the others, so each source's share stays fixed when another
    source grows."""
    base, extra = divmod(total, len(sizes))
    return [min(size, base + (s < extra)) for s, size in enumerate(sizes)]


class EvalBatch(NamedTuple):
    """One micro batch of one source's validation samples."""

    source: int
    """Index of the source in :attr:`EvalLoader.names`."""
    tokens: torch.Tensor
    """(micro_batch_size, seq_len + 1) token ids; always full, so every forward pass has the
    training shape."""
    keep: torch.Tensor
    """(micro_batch_size,) bool: the rows that are samples to count. The others are filler
    (token id 0) where the source's evaluated samples run out, or samples of a corrupt shard
    skipped with ``data.on_corrupt_shard=skip``: computed, never counted."""


class EvalLoader(LoaderBase):
    """Finite, unshuffled pass over each source's validation split in turn (manifest order),
    sources without validation samples left out.

    Each source evaluates its first ``counts[s]`` samples: all of them, or with ``max_samples``
    that many shared evenly over the sources (:func:`share_evenly`). Global batch ``b`` of a
    source is its samples ``[b * W * B, (b + 1) * W * B)`` and rank ``r`` takes rows
    ``[r * B, (r + 1) * B)`` of it; rows past ``counts[s]`` are filler (:class:`EvalBatch`). So
    the samples evaluated are the same on any number of ranks, and every rank yields the same
    number of batches (``len(loader)``), as ZeRO-3 needs (its forward passes are collective).
    """

    def __init__(self, cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                 split: str = "validation", max_samples: int | None = None) -> None:
        super().__init__(cfg, micro_batch_size, rank, world_size, split)
        if not self.sources:
            raise DataError(f"no manifest in data.manifests has a non-empty {split!r} split")
        if max_samples is not None and max_samples <= 0:
            raise DataError(f"max_samples must be positive (got {max_samples})")
        self.names = self._source_names(cfg)
        sizes = [s.num_samples for s in self.sources]
        self.counts = sizes if max_samples is None else share_evenly(max_samples, sizes)
        self.batches_per_source = [math.ceil(c / self.global_batch_size) for c in self.counts]

    def _source_names(self, cfg: LoaderConfig) -> list[str]:
        """The names of the sources kept (a subsequence of ``cfg.manifests``, in order)."""
        locations = [str(m) for m in cfg.manifests]
        names = source_names(locations)
        kept, i = [], 0
        for source in self.sources:
            while locations[i] != source.manifest.location:
                i += 1
            kept.append(names[i])
            i += 1
        return kept

    def __len__(self) -> int:
        return sum(self.batches_per_source)

    def __iter__(self) -> Iterator[EvalBatch]:
        filler = np.zeros(self.seq_len + 1, dtype=np.int64)
        for s, source in enumerate(self.sources):
            reader = ShardReader(source.manifest, self.split, self.cfg.on_corrupt_shard, self.stats,
                                 verify=self.cfg.verify_checksums)
            index = source.index
            try:
                for b in range(self.batches_per_source[s]):
                    first = b * self.global_batch_size + self.rank * self.micro_batch_size
                    rows, keep = [], []
                    for i in range(first, first + self.micro_batch_size):
                        row = None
                        if i < self.counts[s]:
                            shard = int(np.searchsorted(index.first_index, i, side="right") - 1)
                            row = reader.read(shard, i - int(index.first_index[shard]))
                        keep.append(row is not None)
                        rows.append(filler if row is None else row)
                    yield EvalBatch(s, torch.from_numpy(np.stack(rows).astype(np.int64)),
                                    torch.tensor(keep, dtype=torch.bool))
            finally:
                reader.close()


def build_eval_loader(cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                      split: str = "validation", max_samples: int | None = None) -> EvalLoader:
    """An :class:`EvalLoader` over ``split``: every sample, or ``max_samples`` shared evenly over
    the sources."""
    return EvalLoader(cfg, micro_batch_size, rank, world_size, split, max_samples)
