"""The Ray backend of :mod:`data_pipeline.executors.base`: per-file tasks on a Ray cluster.

Every task is a top-level function of one picklable argument that writes its own output files
(or returns its result) and may run twice: Ray reruns a task whose worker process or node died
(``ray.max_retries``), and the rerun overwrites whatever the dead attempt left half-written.
Results are collected as they finish (:meth:`RayExecutor.map_unordered`, cleaning) or in
submission order (:meth:`RayExecutor.map_ordered`, sharding, where order is the output); at most
``max_in_flight`` tasks are outstanding, so neither the driver nor the object store holds more
than a window of results.

Paths inside tasks (``_work/``, clean shards, the tokenizer) must be visible to every node:
a shared filesystem (NFS, Lustre, a FUSE mount of a bucket) on a multi-node cluster.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from crucible.errors import ConfigError, UserError
from data_pipeline.executors.config import RayConfig

log = logging.getLogger("crucible.ray")


def connect(cfg: RayConfig) -> None:
    """Join the configured Ray cluster, or start a local Ray instance, unless already connected."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor=ray needs Ray: pip install 'crucible-lm[ray]' "
                          "(or set executor=local)") from None
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if cfg.address:
        check_reachable(cfg.address)
        kwargs["address"] = cfg.address
    elif cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"ray.address={cfg.address!r}: cannot connect to a Ray cluster ({exc}); "
                          "start one with `ray start --head` or fix the address") from None
    log.info("Ray: %s CPUs in the cluster", ray.cluster_resources().get("CPU", 0))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a wrong ``host:port`` (Ray itself keeps retrying for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"ray.address={address!r}: nothing answers there ({exc}); start the cluster with "
                          "`ray start --head` or fix the address (auto: the cluster on this node)") from None


class RayExecutor:
    """Runs each task as a Ray task (``max_retries`` on worker death, ``cpus_per_task`` CPUs)."""

    def __init__(self, cfg: RayConfig) -> None:
        connect(cfg)
        import ray

        self.cfg = cfg
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = cfg.max_in_flight or max(2 * cpus, 2)

    def _remote(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``task -> ObjectRef``; the task runs in the driver's working directory, so relative
        paths mean on every node what they mean here (given the same shared mount)."""
        import ray

        remote = ray.remote(_run_in).options(max_retries=self.cfg.max_retries, retry_exceptions=False,
                                             num_cpus=self.cfg.cpus_per_task)
        cwd = os.getcwd()
        return lambda task: remote.remote(cwd, fn, task)

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        import ray

        remote = self._remote(fn)
        todo = iter(tasks)
        pending: list[Any] = []
        try:
            while True:
                pending.extend(remote(t) for t in _take(todo, self.window - len(pending)))
                if not pending:
                    return
                done, pending = ray.wait(pending, num_returns=1)
                yield _get(done[0])
        finally:
            _cancel(pending)

    def map_ordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        """Like ``map`` (results in task order) with at most ``max_in_flight`` tasks running ahead."""
        remote = self._remote(fn)
        todo = iter(tasks)
        pending: deque[Any] = deque()
        try:
            while True:
                pending.extend(remote(t) for t in _take(todo, self.window - len(pending)))
                if not pending:
                    return
                yield _get(pending.popleft())
        finally:
            _cancel(list(pending))


def _run_in(cwd: str, fn: Callable[[Any], Any], task: Any) -> Any:
    if os.path.isdir(cwd) and os.getcwd() != cwd:
        os.chdir(cwd)
    return fn(task)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for _ in range(max(n, 0)):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _get(ref: Any) -> Any:
    """The task's result; a user error raised inside a task surfaces as itself (exit 2, one line)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise


def _cancel(refs: list[Any]) -> None:
    import ray

    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception as exc:  # noqa: BLE001 - best effort while already unwinding
            log.debug("could not cancel a Ray task: %s", exc)
