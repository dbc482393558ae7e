"""The exactly resumable streaming loader over token-shard manifests.

Order (a pure function of ``seed`` and the manifests, never of rank count or worker count):

* Each source (one manifest's ``train`` split) has its own epoch counter. In source epoch ``e``
  its shards are permuted with a generator seeded by ``(seed, source, e)``; consecutive groups of
  ``shuffle_buffer_shards`` shards form *windows*, and the samples of each window are permuted by
  ``(seed, source, e, window)``. That gives the source's sample sequence for the epoch.
* Global sample slots ``0, 1, 2, ...`` are assigned to sources by smooth weighted round robin:
  slot ``g`` goes to the source with the largest ``weight * (g + 1) - consumed``, so after any
  number of slots every source's share is within one sample of its weight.
* Global batch ``b`` is slots ``[b * W * B, (b + 1) * W * B)`` (``W`` ranks, micro batch ``B``);
  rank ``r`` takes rows ``[r * B, (r + 1) * B)``. With DataLoader workers, worker ``k`` of ``K``
  builds batches ``k, k + K, ...`` and the DataLoader returns them in order.

Remainder rule: training never drops samples. The samples of a source epoch that do not fill a
last global batch are carried over: that batch is completed with the first samples of the next
epoch. Every rank therefore yields a batch at every step and no rank waits on another.

State: ``state_dict()`` records per source the epoch and the number of samples consumed in it
(world-size independent); ``load_state_dict`` continues exactly there, under any world size,
so no sample of the epoch is repeated or skipped.

Reading: token samples have a fixed size and position inside each tar (see
:mod:`data_pipeline.manifest`), so a rank reads only its own samples: one ``pread`` of the
member's header and data for local files, fsspec range reads (block cache) for URLs. ``pipe:``
URLs cannot seek; such shards are streamed whole and cached per worker (documented cost).
Startup reads only the manifests. Sample headers are checked, token ids are range-checked, and a
short, missing or malformed shard raises :class:`ShardError` naming it, or with
``on_corrupt_shard: skip`` its samples are replaced by another row of the same batch and counted
in ``loader.stats``. No pickle decoder is ever involved.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crucible.errors import DataError
from data_pipeline.loader_config import LoaderConfig
from data_pipeline.manifest import Manifest, SplitIndex, is_url, load_manifest, sample_key

log = logging.getLogger("crucible.loader")

STATE_FORMAT = "crucible.loader-state/1"
OPEN_FILES = 64


class ShardError(DataError):
    """A token shard is missing, truncated or corrupt."""


# ---------------------------------------------------------------- sources and epoch order

@dataclass
class Source:
    manifest: Manifest
    index: SplitIndex
    weight: float

    @property
    def num_samples(self) -> int:
        return self.index.num_samples


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class EpochOrder:
    """The sample sequence of one source epoch: positions -> (shard, sample within shard)."""

    def __init__(self, index: SplitIndex, seed: int, source: int, epoch: int, window_shards: int):
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


# ---------------------------------------------------------------- the position (pure state)

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


# ---------------------------------------------------------------- reading samples

def _open_shard(url: str) -> tuple[Any, int]:
    """``(handle, size)``: an fd for local files, an fsspec file for URLs, bytes for ``pipe:``."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as stream:
            data = stream.read()
        return data, len(data)
    if is_url(url):
        import fsspec

        handle = fsspec.open(url, "rb", cache_type="blockcache", block_size=1 << 20).open()
        return handle, handle.size
    fd = os.open(url, os.O_RDONLY)
    return fd, os.fstat(fd).st_size


class ShardReader:
    """Reads single samples of one split's shards by offset; counts bytes; checks headers."""

    def __init__(self, manifest: Manifest, split: str, on_corrupt: str, stats: dict,
                 memory_shards: int = 4) -> None:
        self.m = manifest
        self.memory_shards = memory_shards  # pipe: shards held whole in memory
        self.index = manifest.splits[split]
        self.on_corrupt = on_corrupt
        self.stats = stats
        self.vocab_size = int(manifest.tokenizer["vocab_size"])
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._bad: set[int] = set()

    def close(self) -> None:
        for handle in self._files.values():
            if isinstance(handle, int):
                os.close(handle)
            elif hasattr(handle, "close"):
                handle.close()
        self._files.clear()

    def _fail(self, shard: int, why: str) -> None:
        url = self.index.urls[shard]
        if self.on_corrupt == "skip":
            if shard not in self._bad:
                log.warning("skipping corrupt token shard %s: %s", url, why)
                self._bad.add(shard)
                self.stats["corrupt_shards"].append(url)
            return
        raise ShardError(
            f"token shard {url} is unusable: {why}. Rebuild the shards (launcher/shard.py) or set "
            "data.on_corrupt_shard=skip to skip and count its samples"
        )

    def _open(self, shard: int) -> Any:
        handle = self._files.get(shard)
        if handle is not None:
            self._files.move_to_end(shard)
            return handle
        url = self.index.urls[shard]
        expected = int(self.index.nbytes[shard])
        try:
            handle, size = _open_shard(url)
        except Exception as exc:  # noqa: BLE001 - any backend's failure becomes a ShardError
            self._fail(shard, f"cannot open it ({type(exc).__name__}: {exc})")
            return None
        if isinstance(handle, bytes):
            self.stats["bytes_read"] += size
        if size != expected:
            self._fail(shard, f"it has {size} bytes, the manifest says {expected} (truncated?)")
        self._files[shard] = handle
        in_memory = [k for k, h in self._files.items() if isinstance(h, bytes)]
        if len(self._files) > OPEN_FILES or len(in_memory) > self.memory_shards:
            victim = in_memory[0] if len(in_memory) > self.memory_shards else next(iter(self._files))
            old = self._files.pop(victim)
            if isinstance(old, int):
                os.close(old)
            elif hasattr(old, "close"):
                old.close()
        return handle

    def _read_range(self, handle: Any, start: int, length: int) -> bytes:
        if isinstance(handle, int):
            data = os.pread(handle, length, start)
        elif isinstance(handle, (bytes, bytearray)):
            return bytes(handle[start:start + length])
        else:
            handle.seek(start)
            data = handle.read(length)
        self.stats["bytes_read"] += len(data)
        return data

    def read(self, shard: int, local: int) -> np.ndarray | None:
        """Tokens of sample ``local`` of ``shard`` (``None`` when skipped as corrupt)."""
        if shard in self._bad:
            self.stats["skipped_samples"] += 1
            return None
        handle = self._open(shard)
        if handle is None or shard in self._bad:
            self.stats["skipped_samples"] += 1
            return None
        m = self.m
        start = local * m.stride
        length = m.header_bytes + m.sample_bytes
        data = self._read_range(handle, start, length)
        name = f"{sample_key(int(self.index.first_index[shard]) + local)}.tokens".encode()
        header = data[m.header_bytes - 512:m.header_bytes]
        problem = None
        if len(data) != length:
            problem = f"sample {local} is cut short at byte {start + len(data)}"
        elif not header.startswith(name + b"\0"):
            problem = f"sample {local} has a bad tar header (expected member {name.decode()})"
        if problem is None:
            tokens = np.frombuffer(data, dtype=m.dtype, offset=m.header_bytes)
            if int(tokens.max()) >= self.vocab_size:
                problem = f"sample {local} holds token ids >= vocab size {self.vocab_size}"
        if problem is not None:
            self._fail(shard, problem)
            self.stats["skipped_samples"] += 1
            return None
        return tokens


def _new_stats() -> dict:
    return {"bytes_read": 0, "skipped_samples": 0, "corrupt_shards": []}


def _assemble(rows: list[np.ndarray | None], where: str) -> torch.Tensor:
    """Stack rows into a LongTensor; skipped rows are replaced by the batch's first good row."""
    good = next((r for r in rows if r is not None), None)
    if good is None:
        raise ShardError(f"every sample of {where} came from corrupt shards; rebuild the shards")
    batch = np.stack([good if r is None else r for r in rows]).astype(np.int64)
    return torch.from_numpy(batch)


# ---------------------------------------------------------------- manifests

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


class _LoaderBase:
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
        self.stats = _new_stats()

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


# ---------------------------------------------------------------- training loader

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
                                    memory_shards=plan.cfg.shuffle_buffer_shards)
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
        return _assemble(rows, f"global batch {step}")

    def close(self) -> None:
        for r in self.readers:
            r.close()


class _WorkerStream(torch.utils.data.IterableDataset):
    """DataLoader dataset: worker k of K yields batches k, k + K, ... from a start schedule."""

    def __init__(self, plan: _Plan, start: Schedule, stats: dict) -> None:
        self.plan = plan
        self.start = start
        self.stats = stats

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        schedule = self.start.copy()
        maker = _BatchMaker(self.plan, self.stats)
        try:
            for _ in range(k):
                schedule.take(maker.global_batch)
            while True:
                yield maker.make(schedule)
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
            _WorkerStream(plan, start, stats), batch_size=None,
            num_workers=plan.cfg.num_workers, prefetch_factor=2, persistent_workers=False,
        )
        for batch in dl:
            schedule.take(plan.global_batch)
            yield batch


class TrainLoader(_LoaderBase):
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

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        self._close_iterator()
        self._iterator = self._generate()
        return self._iterator

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = self._generate()
        return next(self._iterator)

    def _generate(self) -> Iterator[torch.Tensor]:
        return _generate(self._plan, self._schedule, self.stats)

    def _close_iterator(self) -> None:
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None

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
                    "resume with the same manifests, data.seed and data.shuffle_buffer_shards"
                )
        if not np.allclose(state["weights"], self._schedule.weights, rtol=0, atol=1e-12):
            raise DataError(
                f"loader state was saved with mixing weights {state['weights']} but this run has "
                f"{self._schedule.weights}; resume with the same data.weights"
            )
        if len(state.get("sources", [])) != len(self.sources):
            raise DataError(f"loader state has {len(state.get('sources', []))} sources, this run {len(self.sources)}")
        self._close_iterator()
        consumed = [int(src["epoch"]) * s.num_samples + int(src["position"])
                    for src, s in zip(state["sources"], self.sources, strict=True)]
        self._schedule.consumed_samples = int(state["consumed_samples"])
        self._schedule.source_consumed = consumed

    @property
    def consumed_samples(self) -> int:
        return self._schedule.consumed_samples

    def epoch_batches(self) -> int:
        """Global batches that fit entirely in one epoch of a single source (informational)."""
        return self.sources[0].num_samples // self.global_batch_size


def build_train_loader(cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int) -> TrainLoader:
    """The training stream of one rank (see the module docstring for order and state)."""
    return TrainLoader(cfg, micro_batch_size, rank, world_size)


# ---------------------------------------------------------------- evaluation loader

class EvalLoader(_LoaderBase):
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
        readers = [ShardReader(s.manifest, self.split, self.cfg.on_corrupt_shard, self.stats)
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
                yield _assemble(rows, f"{self.split} batch {b}")
        finally:
            for r in readers:
                r.close()


def build_eval_loader(cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                      split: str = "validation") -> EvalLoader:
    return EvalLoader(cfg, micro_batch_size, rank, world_size, split)
