"""Where per-input work runs: in this process, in local worker processes, or on Ray.

An executor maps a picklable top-level function over picklable tasks and yields results as
they finish (any order). Tasks write their own output files, so the order in which they finish
never changes a run's output; this is what makes the output independent of the worker count
and lets another backend (Ray) slot in behind the same ``map_unordered``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Executor(Protocol):
    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        ...


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


def build_executor(kind: str, workers: int, ray_cfg: Any = None) -> Executor:
    """The executor for config ``executor`` (local | ray), ``workers`` (0: all cores), ``ray``."""
    if kind == "ray":
        from data_pipeline.ray_config import RayConfig
        from data_pipeline.ray_executor import RayExecutor

        return RayExecutor(ray_cfg if ray_cfg is not None else RayConfig())
    n = resolve_workers(workers)
    return InlineExecutor() if n == 1 else LocalExecutor(n)
