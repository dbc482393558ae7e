"""What both loaders share: their sources (manifests with weights) and the rank geometry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from crucible.errors import DataError
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.reading import new_stats
from data_pipeline.shards.manifest import Manifest, SplitIndex, load_manifest


@dataclass
class Source:
    manifest: Manifest
    index: SplitIndex
    weight: float

    @property
    def num_samples(self) -> int:
        return self.index.num_samples


def load_sources(cfg: LoaderConfig, split: str = "train") -> list[Source]:
    if not cfg.manifests:
        raise DataError("data.manifests is empty: give the manifest.json of at least one token-shard set")
    manifests = [load_manifest(m) for m in cfg.manifests]
    first = manifests[0]
    for m in manifests[1:]:
        for what, a, b in (("tokenizer sha256", m.tokenizer.get("sha256"), first.tokenizer.get("sha256")),
                           ("seq_len", m.seq_len, first.seq_len), ("dtype", m.data["dtype"], first.data["dtype"])):
            if a != b:
                raise DataError(
                    f"manifests {first.location} and {m.location} differ in {what} ({b} vs {a}); "
                    "all sources must share tokenizer, seq_len and dtype"
                )
    sources = []
    for i, m in enumerate(manifests):
        if split not in m.splits or m.splits[split].num_samples == 0:
            if split == "train":
                raise DataError(f"manifest {m.location} has no {split} samples")
            continue
        index = m.splits[split]
        weight = cfg.weights[i] if cfg.weights is not None else float(index.num_samples)
        sources.append(Source(m, index, float(weight)))
    return sources


class LoaderBase:
    def __init__(self, cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                 split: str) -> None:
        if micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(
                f"bad loader geometry: micro_batch_size={micro_batch_size}, rank={rank}, "
                f"world_size={world_size}"
            )
        self.cfg = cfg
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.sources = load_sources(cfg, split)
        self.split = split
        self.stats = new_stats()

    @property
    def _first(self) -> Manifest:
        return self.sources[0].manifest

    @property
    def seq_len(self) -> int:
        return self._first.seq_len

    @property
    def vocab_size(self) -> int:
        return int(self._first.tokenizer["vocab_size"])

    @property
    def tokenizer(self) -> dict:
        return self._first.tokenizer

    @property
    def manifest_sha256s(self) -> list[str]:
        return [s.manifest.sha256 for s in self.sources]

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def skipped_samples(self) -> int:
        """Samples of this rank replaced because their shard was unusable
        (``data.on_corrupt_shard=skip``), in the batches handed out so far by this process."""
        return int(self.stats["skipped_samples"])


class ResumableStream:
    """The iteration protocol of a training stream: one live generator of batches
    (:meth:`_generate`, from the stream's own state); ``iter()`` restarts it from that state, and
    :meth:`close` ends it at once (its open shards and DataLoader workers go with it)."""

    _iterator: Iterator[torch.Tensor] | None = None

    def _generate(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._close_iterator()
        self._iterator = self._generate()
        return self._iterator

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = self._generate()
        return next(self._iterator)

    def close(self) -> None:
        """End the live iterator (iterating again starts from ``state_dict()``)."""
        self._close_iterator()

    def _close_iterator(self) -> None:
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None
