"""Dedup across all inputs as a shuffle by hash bucket, for executor=ray (runs on any executor).

Gives exactly the decisions of :func:`data_pipeline.clean.dedup.find_duplicates`, without holding
all hashes in one process:

1. **exact, map** (one task per group of consecutive inputs, ~100k documents): each row
   ``(hi, lo, global index)`` goes to bucket ``hi % buckets`` (``shuffle/exact/BBBB/PPPPPP.u64``).
2. **exact, reduce** (one task per bucket): rows sorted by ``(hi, lo, index)``; all but the
   first of equal hashes are exact duplicates. Same rule as the local pass: the earliest
   document in run order is kept.
3. **bands, map** (one task per group of inputs): for every document that is not an exact duplicate and
   every band, ``(band, index, band values...)`` goes to the bucket of a hash of
   ``(band, band values)``.
4. **bands, reduce** (one task per bucket): groups of equal ``(band, values)``; each member
   after the first (in run order) yields an edge ``(member, first)``.
5. The driver joins the edges with union-find and drops every member of a cluster but the
   earliest, as the local pass does. The local pass links exactly these edges, so the clusters,
   hence the dropped documents, are the same.

Memory per reduce task is about ``1/buckets`` of all rows (16 + 8 bytes per document for the
exact pass, ``bands x (rows + 2) x 8`` bytes per document for the band pass); a map task holds one
input's rows of one band at a time. The driver holds the duplicate edges (a few per duplicate document).
Files go through the run's ``_work/`` folder, which every node must see (shared filesystem).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_pipeline.clean.config import DedupConfig
from data_pipeline.clean.dedup import find_root, load_rows
from data_pipeline.executors.base import Executor

_GOLDEN = 0x9E3779B97F4A7C15
_FNV = np.uint64(0x100000001B3)


def _bucket_file(folder: Path, bucket: int, part: int) -> Path:
    return folder / f"{bucket:04d}" / f"{part:06d}.u64"


class _BucketFiles:
    """Appends rows to ``folder/BBBB/part.u64`` by bucket; a retried task starts from empty files."""

    def __init__(self, folder: Path, part: int, buckets: int) -> None:
        self.folder, self.part, self.buckets = folder, part, buckets
        for b in range(buckets):
            _bucket_file(folder, b, part).unlink(missing_ok=True)
        self.files: dict[int, object] = {}

    def write(self, rows: np.ndarray, bucket_of_row: np.ndarray) -> None:
        order = np.argsort(bucket_of_row, kind="stable")
        bounds = np.searchsorted(bucket_of_row[order], np.arange(self.buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            if b not in self.files:
                path = _bucket_file(self.folder, b, self.part)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.files[b] = open(path, "ab")  # noqa: SIM115 - closed in close()
            self.files[b].write(np.ascontiguousarray(rows[order[bounds[b]:bounds[b + 1]]]).tobytes())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def exact_map(task: tuple[list[tuple[str, int]], int, str, int]) -> int:
    """Rows of a group of consecutive inputs (``(file, first global index)`` each) into buckets."""
    inputs, part, folder, buckets = task
    sink = _BucketFiles(Path(folder), part, buckets)
    try:
        for exact_file, offset in inputs:
            hashes = load_rows(Path(exact_file), np.uint64, 2)
            rows = np.empty((len(hashes), 3), dtype=np.uint64)
            rows[:, :2] = hashes
            rows[:, 2] = np.arange(offset, offset + len(hashes), dtype=np.uint64)
            sink.write(rows, (rows[:, 0] % np.uint64(buckets)).astype(np.int64))
    finally:
        sink.close()
    return part


def exact_reduce(task: tuple[str, int, int]) -> np.ndarray:
    """Global indices of the exact duplicates whose hash falls in this bucket."""
    folder, bucket, parts = task
    rows = _load_bucket(Path(folder), bucket, parts, 3)
    if not len(rows):
        return np.zeros(0, dtype=np.int64)
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    same = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
    return rows[1:, 2][same].astype(np.int64)


def band_map(task: tuple[list[tuple[str, int]], int, str, int, int, int, str]) -> int:
    inputs, part, folder, buckets, bands, rows_per_band, exact_dropped = task
    dropped = np.load(exact_dropped, mmap_mode="r", allow_pickle=False)  # sorted global indices
    sink = _BucketFiles(Path(folder), part, buckets)
    try:
        for sig_file, offset in inputs:
            sigs = load_rows(Path(sig_file), np.uint32, bands * rows_per_band)
            index = np.arange(offset, offset + len(sigs), dtype=np.int64)
            lo, hi = np.searchsorted(dropped, [offset, offset + len(sigs)])
            alive = ~np.isin(index, dropped[lo:hi])
            _band_rows(sink, sigs[alive], index[alive].astype(np.uint64), bands, rows_per_band, buckets)
    finally:
        sink.close()
    return part


def _band_rows(sink: _BucketFiles, sigs: np.ndarray, index: np.ndarray, bands: int, rows_per_band: int,
               buckets: int) -> None:
    for band in range(bands):
        values = np.ascontiguousarray(sigs[:, band * rows_per_band:(band + 1) * rows_per_band]).astype(np.uint64)
        h = np.full(len(values), ((band + 1) * _GOLDEN) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
        for c in range(rows_per_band):  # FNV-style mix, wrapping uint64 arithmetic
            h = (h ^ values[:, c]) * _FNV
        rows = np.empty((len(values), rows_per_band + 2), dtype=np.uint64)
        rows[:, 0] = band
        rows[:, 1] = index
        rows[:, 2:] = values
        sink.write(rows, ((h >> np.uint64(33)) % np.uint64(buckets)).astype(np.int64))


def band_reduce(task: tuple[str, int, int, int]) -> np.ndarray:
    """``(member, first)`` edges of documents sharing a band with an earlier document."""
    folder, bucket, parts, rows_per_band = task
    rows = _load_bucket(Path(folder), bucket, parts, rows_per_band + 2)
    if not len(rows):
        return np.zeros((0, 2), dtype=np.int64)
    keys = [rows[:, 1]] + [rows[:, c] for c in range(rows_per_band + 1, 1, -1)] + [rows[:, 0]]
    rows = rows[np.lexsort(keys)]  # by band, values, then index
    group_key = np.concatenate([rows[:, :1], rows[:, 2:]], axis=1)
    starts = np.ones(len(rows), bool)
    starts[1:] = np.any(group_key[1:] != group_key[:-1], axis=1)
    first = rows[:, 1][np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    linked = ~starts
    return np.stack([rows[linked, 1], first[linked]], axis=1).astype(np.int64)


def _load_bucket(folder: Path, bucket: int, parts: int, width: int) -> np.ndarray:
    paths = [_bucket_file(folder, bucket, p) for p in range(parts)]
    chunks = [np.asarray(load_rows(f, np.uint64, width)) for f in paths if f.is_file()]
    chunks = [c for c in chunks if len(c)]
    return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.uint64)


def find_duplicates_shuffled(exact_files: list[Path], sig_files: list[Path], cfg: DedupConfig,
                             executor: Executor, work: Path, buckets: int,
                             docs_per_map: int = 100_000) -> dict[int, str]:
    """Same result as :func:`data_pipeline.clean.dedup.find_duplicates`, computed as a bucketed shuffle."""
    shuffle = Path(work) / "shuffle"
    shutil.rmtree(shuffle, ignore_errors=True)
    counts = [Path(f).stat().st_size // 16 for f in exact_files]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    groups = map_groups(counts, docs_per_map)
    parts = len(groups)
    dropped_exact = np.zeros(0, dtype=np.int64)
    if cfg.exact and parts:
        folder = str(shuffle / "exact")
        list(executor.map_unordered(exact_map, [([(str(exact_files[i]), offsets[i]) for i in g], part, folder, buckets)
                                                for part, g in enumerate(groups)]))
        found = list(executor.map_unordered(exact_reduce, [(folder, b, parts) for b in range(buckets)]))
        dropped_exact = np.sort(np.concatenate(found)) if found else dropped_exact
    dropped = {int(i): "dedup.exact" for i in dropped_exact.tolist()}
    if not cfg.near or not parts or not sum(counts):
        shutil.rmtree(shuffle, ignore_errors=True)
        return dropped
    shuffle.mkdir(parents=True, exist_ok=True)
    exact_path = shuffle / "exact_dropped.npy"
    np.save(exact_path, dropped_exact, allow_pickle=False)
    folder = str(shuffle / "bands")
    list(executor.map_unordered(band_map, [([(str(sig_files[i]), offsets[i]) for i in g], part, folder, buckets,
                                            cfg.bands, cfg.rows, str(exact_path)) for part, g in enumerate(groups)]))
    edges = list(executor.map_unordered(band_reduce, [(folder, b, parts, cfg.rows) for b in range(buckets)]))
    dropped.update(_clusters(np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)))
    shutil.rmtree(shuffle, ignore_errors=True)
    return dropped


def map_groups(counts: list[int], docs_per_map: int) -> list[list[int]]:
    """Consecutive inputs in groups of about ``docs_per_map`` documents: one map task each, so
    thousands of small inputs do not make thousands of tiny tasks and bucket files."""
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(counts):
        if not groups or (size + n > docs_per_map and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def _clusters(edges: np.ndarray) -> dict[int, str]:
    """Union-find over the edges; every cluster member but the earliest is a near duplicate."""
    if not len(edges):
        return {}
    nodes, local = np.unique(edges, return_inverse=True)
    local = local.reshape(-1, 2)
    parent = np.arange(len(nodes), dtype=np.int64)
    for a, b in local.tolist():
        ra, rb = find_root(parent, a), find_root(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # nodes are sorted: the smaller local id is earlier
    return {int(nodes[i]): "dedup.near" for i in range(len(nodes)) if find_root(parent, i) != i}
