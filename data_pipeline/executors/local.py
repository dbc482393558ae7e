"""Executors on this machine: inline (one task after another) and a pool of worker processes."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class InlineExecutor:
    """Runs tasks one after another in this process (workers=1; easiest to debug)."""

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        for task in tasks:
            yield fn(task)


class LocalExecutor:
    """A pool of ``workers`` processes (forkserver start: safe with threads in the parent)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ctx.Pool(self.workers, maxtasksperchild=64) as pool:
            yield from pool.imap_unordered(fn, tasks, chunksize=1)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
