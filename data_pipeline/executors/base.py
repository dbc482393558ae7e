"""The executor protocol, and the executor a data-stage config asks for.

An executor maps a picklable top-level function over picklable tasks and yields results as
they finish (any order). Tasks write their own output files, so the order in which they finish
never changes a run's output; this is what makes the output independent of the worker count
and lets another backend (Ray) slot in behind the same ``map_unordered``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from data_pipeline.executors.config import RayConfig
from data_pipeline.executors.local import InlineExecutor, LocalExecutor, resolve_workers


class Executor(Protocol):
    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        ...


def build_executor(kind: str, workers: int, ray_cfg: RayConfig | None = None) -> Executor:
    """The executor for config ``executor`` (local | ray), ``workers`` (0: all cores), ``ray``."""
    if kind == "ray":
        from data_pipeline.executors.ray import RayExecutor  # imports Ray only when asked for

        return RayExecutor(ray_cfg if ray_cfg is not None else RayConfig())
    n = resolve_workers(workers)
    return InlineExecutor() if n == 1 else LocalExecutor(n)
