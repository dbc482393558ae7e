"""The training loader: an infinite, exactly resumable stream of one rank's batches.

* Global batch ``b`` is slots ``[b * W * B, (b + 1) * W * B)`` of the order (:mod:`.order`;
  ``W`` ranks, micro batch ``B``); rank ``r`` takes rows ``[r * B, (r + 1) * B)``. With
  DataLoader workers, worker ``k`` of ``K`` builds batches ``k, k + K, ...`` and the DataLoader
  returns them in order.

Remainder rule: training never drops samples. The samples of a source epoch that do not fill a
last global batch are carried over: that batch is completed with the first samples of the next
epoch. Every rank therefore yields a batch at every step and no rank waits on another.

State: ``state_dict()`` records per source the epoch and the number of samples consumed in it
(world-size independent); ``load_state_dict`` continues exactly there, under any world size,
so no sample of the epoch is repeated or skipped. Startup reads only the manifests.

Counters (``loader.stats``, ``loader.skipped_samples``) cover the batches handed out: a
DataLoader worker sends its counts with each batch, so they are the same for any worker count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crucible.errors import DataError
from data_pipeline.loader.base import LoaderBase, ResumableStream, Source
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.order import EpochOrder, Schedule
from data_pipeline.loader.reading import (
    ShardError,
    ShardReader,
    add_stats,
    assemble_batch,
    new_stats,
    take_stats,
)

STATE_FORMAT = "crucible.loader-state/1"


@dataclass
class _Plan:
    """What a process needs to build this rank's batches (no reference back to the loader, so
    dropping a loader closes its iterator and DataLoader workers at once)."""

    sources: list[Source]
    cfg: LoaderConfig
    rank: int
    micro_batch_size: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size


class _BatchMaker:
    """Builds this rank's rows of successive global batches from a schedule (one per process)."""

    def __init__(self, plan: _Plan, stats: dict) -> None:
        self.sources = plan.sources
        self.cfg = plan.cfg
        self.rows = slice(plan.rank * plan.micro_batch_size, (plan.rank + 1) * plan.micro_batch_size)
        self.global_batch = plan.global_batch
        self.readers = [ShardReader(s.manifest, "train", plan.cfg.on_corrupt_shard, stats,
                                    memory_shards=plan.cfg.shuffle_buffer_shards,
                                    verify=plan.cfg.verify_checksums)
                        for s in self.sources]
        self._orders: dict[tuple[int, int], EpochOrder] = {}

    def order(self, source: int, epoch: int) -> EpochOrder:
        key = (source, epoch)
        if key not in self._orders:
            self._orders[key] = EpochOrder(self.sources[source].index, self.cfg.seed, source, epoch,
                                           self.cfg.shuffle_buffer_shards)
            for old in [k for k in self._orders if k[0] == source and k[1] < epoch]:
                del self._orders[old]
        return self._orders[key]

    def make(self, schedule: Schedule) -> torch.Tensor:
        step = schedule.consumed_samples // self.global_batch
        slots = schedule.take(self.global_batch)[self.rows]
        rows = []
        for source, epoch, position in slots:
            shard, local = self.order(source, epoch).locate(position)
            rows.append(self.readers[source].read(shard, local))
        return assemble_batch(rows, f"global batch {step}")

    def close(self) -> None:
        for r in self.readers:
            r.close()


class _WorkerStream(torch.utils.data.IterableDataset):
    """DataLoader dataset: worker k of K yields batches k, k + K, ... from a start schedule,
    each with the counters it added (:func:`take_stats`); a corrupt shard under ``error`` ends
    the stream with its message instead of a batch, so the training process raises the same one
    line as without workers."""

    def __init__(self, plan: _Plan, start: Schedule) -> None:
        self.plan = plan
        self.start = start

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, dict]]:
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        schedule = self.start.copy()
        stats = new_stats()
        maker = _BatchMaker(self.plan, stats)
        try:
            for _ in range(k):
                schedule.take(maker.global_batch)
            while True:
                try:
                    batch = maker.make(schedule)
                except ShardError as exc:
                    yield None, {**take_stats(stats), "error": str(exc)}
                    return
                yield batch, take_stats(stats)
                for _ in range(n - 1):
                    schedule.take(maker.global_batch)
        finally:
            maker.close()


def _generate(plan: _Plan, schedule: Schedule, stats: dict) -> Iterator[torch.Tensor]:
    """Batches from ``schedule``'s position on; advances ``schedule`` as each is handed out."""
    start = schedule.copy()
    if plan.cfg.num_workers == 0:
        maker = _BatchMaker(plan, stats)
        try:
            while True:
                batch = maker.make(start)
                schedule.take(plan.global_batch)
                yield batch
        finally:
            maker.close()
    else:
        dl = torch.utils.data.DataLoader(
            _WorkerStream(plan, start), batch_size=None,
            num_workers=plan.cfg.num_workers, prefetch_factor=2, persistent_workers=False,
        )
        batches = iter(dl)
        try:
            for batch, delta in batches:
                error = delta.pop("error", None)
                add_stats(stats, delta)
                if error is not None:
                    raise ShardError(error)
                schedule.take(plan.global_batch)
                yield batch
        finally:
            # stop the workers now: a traceback that keeps this frame alive would otherwise
            # delay it to a garbage collection, where the shutdown waits seconds per worker
            del batches


class TrainLoader(ResumableStream, LoaderBase):
    """Infinite stream of ``(micro_batch_size, seq_len + 1)`` LongTensors for one rank.

    Iterate it (``for batch in loader`` or ``next(loader)``); only one iterator is live at a
    time: a new ``iter()`` or ``load_state_dict`` ends the previous one. ``state_dict()`` is
    the position after the last batch handed out.
    """

    def __init__(self, cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int) -> None:
        super().__init__(cfg, micro_batch_size, rank, world_size, "train")
        self._schedule = Schedule(self.sources)
        self._plan = _Plan(self.sources, cfg, rank, micro_batch_size, world_size)
        self._iterator: Iterator[torch.Tensor] | None = None

    def _generate(self) -> Iterator[torch.Tensor]:
        return _generate(self._plan, self._schedule, self.stats)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        s = self._schedule
        return {
            "format": STATE_FORMAT,
            "seed": self.cfg.seed,
            "shuffle_buffer_shards": self.cfg.shuffle_buffer_shards,
            "manifest_sha256s": self.manifest_sha256s,
            "weights": list(s.weights),
            "consumed_samples": s.consumed_samples,
            "sources": [
                {"manifest_sha256": src.manifest.sha256, "epoch": c // src.num_samples,
                 "position": c % src.num_samples, "consumed_samples": c}
                for src, c in zip(self.sources, s.source_consumed, strict=True)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken (any world size, micro batch or worker count)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a loader state (format {STATE_FORMAT!r} expected)")
        for key, mine in (("manifest_sha256s", self.manifest_sha256s), ("seed", self.cfg.seed),
                          ("shuffle_buffer_shards", self.cfg.shuffle_buffer_shards)):
            if state.get(key) != mine:
                raise DataError(
                    f"loader state was saved with {key}={state.get(key)!r} but this run has {mine!r}; "
                    "resume with the same manifests, data.seed and data.shuffle_buffer_shards (to train "
                    "on another mix from some step on, declare it as a data phase: data.phases="
                    "[{start_step: <step>, manifests: [...], weights: [...]}])"
                )
        if not np.allclose(state["weights"], self._schedule.weights, rtol=0, atol=1e-12):
            raise DataError(
                f"loader state was saved with mixing weights {state['weights']} but this run has "
                f"{self._schedule.weights}; resume with the same data.weights (or declare the new "
                "weights as a data phase: data.phases=[{start_step: <step>, manifests: [...], weights: [...]}])"
            )
        if len(state.get("sources", [])) != len(self.sources):
            raise DataError(f"loader state has {len(state.get('sources', []))} sources, this run {len(self.sources)}")
        self._close_iterator()
        consumed = [int(src["epoch"]) * s.num_samples + int(src["position"])
                    for src, s in zip(state["sources"], self.sources, strict=True)]
        self._schedule.consumed_samples = int(state["consumed_samples"])
        self._schedule.source_consumed = consumed

    def rewind(self) -> None:
        """Back to the first sample of the order (nothing consumed)."""
        self._close_iterator()
        self._schedule = Schedule(self.sources)

    @property
    def consumed_samples(self) -> int:
        return self._schedule.consumed_samples

    def epoch_batches(self) -> int:
        """Global batches that fit entirely in one epoch of a single source (informational)."""
        return self.sources[0].num_samples // self.global_batch_size


def build_train_loader(cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int) -> TrainLoader:
    """The training stream of one rank over one mix (see the module docstring for order and
    state); :func:`data_pipeline.loader.phases.build_train_stream` also takes ``data.phases``."""
    if cfg.phases:
        raise DataError("data.phases needs the phased loader: build it with "
                        "data_pipeline.loader.phases.build_train_stream")
    return TrainLoader(cfg, micro_batch_size, rank, world_size)
