"""The evaluation loader: one finite, unshuffled pass over the validation splits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from crucible.errors import DataError
from data_pipeline.loader.base import LoaderBase
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.reading import ShardReader, assemble_batch


class EvalLoader(LoaderBase):
    """Finite, unshuffled pass over the validation splits (sources in manifest order).

    Global batch ``b`` is samples ``[b * W * B, (b + 1) * W * B)`` of the concatenated splits,
    rank ``r`` takes rows ``[r * B, (r + 1) * B)``. The samples that cannot fill a last global
    batch are dropped, so every rank yields ``len(loader)`` batches.
    """

    def __init__(self, cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                 split: str = "validation") -> None:
        super().__init__(cfg, micro_batch_size, rank, world_size, split)
        if not self.sources:
            raise DataError(f"no manifest in data.manifests has a non-empty {split!r} split")
        self.total = sum(s.num_samples for s in self.sources)
        self.num_batches = self.total // self.global_batch_size
        if self.num_batches == 0:
            raise DataError(
                f"the {split} split has {self.total} samples, fewer than one global batch "
                f"({self.micro_batch_size} x {self.world_size} ranks); lower the micro batch size "
                "or raise shard.validation_fraction"
            )
        self.dropped_samples = self.total - self.num_batches * self.global_batch_size
        self._starts = np.cumsum([0] + [s.num_samples for s in self.sources])

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        readers = [ShardReader(s.manifest, self.split, self.cfg.on_corrupt_shard, self.stats,
                               verify=self.cfg.verify_checksums)
                   for s in self.sources]
        try:
            for b in range(self.num_batches):
                first = b * self.global_batch_size + self.rank * self.micro_batch_size
                rows = []
                for g in range(first, first + self.micro_batch_size):
                    s = int(np.searchsorted(self._starts, g, side="right") - 1)
                    i = g - int(self._starts[s])
                    index = self.sources[s].index
                    shard = int(np.searchsorted(index.first_index, i, side="right") - 1)
                    rows.append(readers[s].read(shard, i - int(index.first_index[shard])))
                yield assemble_batch(rows, f"{self.split} batch {b}")
        finally:
            for r in readers:
                r.close()


def build_eval_loader(cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                      split: str = "validation") -> EvalLoader:
    return EvalLoader(cfg, micro_batch_size, rank, world_size, split)
