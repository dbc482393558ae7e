"""Training order: a pure function of ``seed`` and the manifests, never of rank or worker count.

* Each source (one manifest's ``train`` split) has its own epoch counter. In source epoch ``e``
  its shards are permuted with a generator seeded by ``(seed, source, e)``; consecutive groups of
  ``shuffle_buffer_shards`` shards form *windows*, and the samples of each window are permuted by
  ``(seed, source, e, window)``. That gives the source's sample sequence for the epoch.
* Global sample slots ``0, 1, 2, ...`` are assigned to sources by smooth weighted round robin:
  slot ``g`` goes to the source with the largest ``weight * (g + 1) - consumed``, so after any
  number of slots every source's share is within one sample of its weight.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from data_pipeline.loader.base import Source
from data_pipeline.shards.manifest import SplitIndex


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class EpochOrder:
    """The sample sequence of one source epoch: positions -> (shard, sample within shard)."""

    def __init__(self, index: SplitIndex, seed: int, source: int, epoch: int, window_shards: int) -> None:
        self.index = index
        self.key = (seed, source, epoch)
        self.shard_order = _rng(seed, source, epoch).permutation(len(index.samples))
        counts = index.samples[self.shard_order]
        self.window_shards = window_shards
        n_windows = -(-len(counts) // window_shards)
        sizes = np.add.reduceat(counts, np.arange(0, len(counts), window_shards)) if len(counts) else []
        self.window_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.num_windows = n_windows

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        if w in self._cache:
            self._cache.move_to_end(w)
            return self._cache[w]
        shards = self.shard_order[w * self.window_shards:(w + 1) * self.window_shards]
        counts = self.index.samples[shards]
        shard_of = np.repeat(shards, counts)
        local = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
            np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        perm = _rng(*self.key, w).permutation(len(shard_of))
        self._cache[w] = (shard_of[perm], local[perm])
        if len(self._cache) > 2:
            self._cache.popitem(last=False)
        return self._cache[w]

    def locate(self, position: int) -> tuple[int, int]:
        w = int(np.searchsorted(self.window_start, position, side="right") - 1)
        shard_of, local = self._window(w)
        i = position - int(self.window_start[w])
        return int(shard_of[i]), int(local[i])


class Schedule:
    """Which (source, epoch, position) each global slot takes; no I/O, cheap to advance."""

    def __init__(self, sources: list[Source]) -> None:
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self.sizes = [s.num_samples for s in sources]
        self.consumed_samples = 0
        self.source_consumed = [0] * len(sources)

    def take(self, n: int) -> list[tuple[int, int, int]]:
        """Advance by ``n`` slots; returns ``(source, epoch, position)`` for each."""
        slots = []
        for _ in range(n):
            g = self.consumed_samples
            if len(self.sizes) == 1:
                s = 0
            else:
                s = max(range(len(self.sizes)),
                        key=lambda i: (self.weights[i] * (g + 1) - self.source_consumed[i], -i))
            c = self.source_consumed[s]
            slots.append((s, c // self.sizes[s], c % self.sizes[s]))
            self.source_consumed[s] = c + 1
            self.consumed_samples = g + 1
        return slots

    def copy(self) -> Schedule:
        other = object.__new__(Schedule)
        other.weights, other.sizes = self.weights, self.sizes
        other.consumed_samples = self.consumed_samples
        other.source_consumed = list(self.source_consumed)
        return other
