"""Measurements for the training metrics: device peak for MFU, peak memory, model-state bytes.

The metrics of a step (``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_second``, ``train/mfu``, ``train/data_wait_fraction``, ``train/step_time``,
``train/memory_gb``, ``train/skipped_steps``, ``data/skipped_samples``; ``val/loss``,
``val/perplexity``, ``val/bits_per_byte``, ``val/<source>/loss`` and
``val/<source>/bits_per_byte`` (a subset of each source's validation split, see
:meth:`training.steps.language_model.LanguageModelStep.evaluate`), the same under ``val_full/``
once at the end (every validation sequence), or ``dev/...`` for task heads;
``checkpoint/save_seconds``; ``startup/seconds_to_first_step`` with step 1) are built by the loop
and written by :class:`training.callbacks.metrics.MetricsLogger`. ``data/skipped_samples`` is the run's total
of training samples the loader replaced because their shard was unusable
(``data.on_corrupt_shard=skip``), summed over ranks within the step's one all-reduce and kept in
the checkpoints' trainer state.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crucible.fileio import atomic_write_json
from training.collectives import barrier, gather_objects

log = logging.getLogger("crucible.training.metrics")

# Dense peak TFLOP/s of one GPU by the precision of its matrix multiplications (vendor
# datasheets, no sparsity): bf16/fp16 tensor cores, tf32 (fp32 training with TF32 matmuls
# allowed) and plain fp32. A100 40 GB and 80 GB, SXM and PCIe, share their compute peaks.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "A100 40GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 80GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}
# torch.cuda.get_device_name() -> the row above; whole names only, so an L40 is never taken
# for an L4 nor an H100 NVL for an H100 SXM
GPU_MODELS: dict[str, str] = {
    "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL", "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA B200": "B200",
    "NVIDIA A100-SXM4-40GB": "A100 40GB", "NVIDIA A100-PCIE-40GB": "A100 40GB",
    "NVIDIA A100-SXM4-80GB": "A100 80GB", "NVIDIA A100 80GB PCIe": "A100 80GB",
    "NVIDIA L40S": "L40S", "NVIDIA L40": "L40", "NVIDIA L4": "L4", "NVIDIA A10G": "A10G",
    "Tesla V100-SXM2-16GB": "V100", "Tesla V100-SXM2-32GB": "V100", "Tesla V100-PCIE-16GB": "V100",
    "Tesla V100-PCIE-32GB": "V100", "NVIDIA GeForce RTX 4090": "RTX 4090",
}
_warned_unknown: set[str] = set()


def gpu_peak_tflops(name: str, precision: str, tf32: bool = False) -> float | None:
    """Dense peak of the GPU called ``name`` for ``precision`` (fp32 with ``tf32`` matmuls uses
    the TF32 peak), or None for a GPU (or precision) not in the table."""
    peaks = GPU_PEAK_TFLOPS.get(GPU_MODELS.get(name.strip(), ""), {})
    return peaks.get("tf32" if precision == "fp32" and tf32 else precision)


def measure_cpu_gemm_tflops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` fp32 GEMM throughput of this process (its torch threads) in TFLOP/s."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


CACHE_DIR_ENV = "CRUCIBLE_CACHE_DIR"
CPU_PEAK_CACHE_FILE = "cpu_peak_tflops.json"


def cache_dir() -> Path:
    """Crucible's per-user cache: ``$CRUCIBLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/crucible``,
    else ``~/.cache/crucible``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crucible"


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_peak_key(threads: int, dtype: torch.dtype = torch.float32) -> str:
    """What a cached CPU peak depends on: CPU model, core count, threads, dtype, torch version."""
    return (f"{cpu_model_name()} | {os.cpu_count()} cores | {threads} threads | "
            f"{str(dtype).removeprefix('torch.')} | torch {torch.__version__}")


def cached_cpu_peak_tflops(threads: int, dtype: torch.dtype = torch.float32, cache_file: Path | None = None,
                           measure: Callable[[], float] | None = None) -> float:
    """The GEMM peak of ``threads`` torch threads on this machine, measured once and cached.

    MFU divides by this peak, so it must not depend on how many ranks share the machine: every
    rank measuring at once (the old way) competes for the cores and memory bandwidth, and a
    2-rank run reported 75-93 % MFU where one rank reported 51 %. The peak is measured alone
    (see :func:`cpu_peak_tflops_on_ranks`) with the thread count the rank trains with, and kept
    in ``<cache_dir>/cpu_peak_tflops.json`` keyed by :func:`cpu_peak_key`; delete that file (or
    point ``CRUCIBLE_CACHE_DIR`` elsewhere) to measure again. A peak measured while other jobs
    load the cores comes out low (and MFU high) until then. A cache that cannot be read or
    written costs a measurement, never the run.
    """
    path = cache_file or cache_dir() / CPU_PEAK_CACHE_FILE
    key = cpu_peak_key(threads, dtype)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("tflops"), (int, float)) and entry["tflops"] > 0:
        return float(entry["tflops"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # best of 25 (~0.5 s on one thread): 5 came out up to 20 % low on an idle machine
        peak = measure() if measure is not None else measure_cpu_gemm_tflops(repeats=25, dtype=dtype)
    finally:
        torch.set_num_threads(previous)
    log.info("measured the CPU GEMM peak: %.3f TFLOP/s (%s); cached in %s", peak, key, path)
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = {"tflops": peak, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_json(path, cached)
    except OSError as exc:
        log.warning("could not cache the CPU peak in %s (%s): the next run measures it again", path, exc)
    return peak


def cpu_peak_tflops_on_ranks(rank: int, world_size: int) -> float:
    """This rank's CPU peak (:func:`cached_cpu_peak_tflops` for its torch threads), measured by
    one rank at a time: the first rank of each (host, threads) pair looks it up or measures it
    while every other rank waits at a barrier, then every rank takes its pair's value."""
    threads = torch.get_num_threads()
    if world_size == 1:
        return cached_cpu_peak_tflops(threads)
    keys = gather_objects((socket.gethostname(), threads), world_size)
    first = {key: keys.index(key) for key in keys}
    peak: float | None = None
    for measurer in sorted(set(first.values())):
        if measurer == rank:
            peak = cached_cpu_peak_tflops(threads)
        barrier()
    peaks = gather_objects(peak, world_size)
    return peaks[first[keys[rank]]]


def device_peak_tflops(device: torch.device, precision: str, override: float | None = None,
                       rank: int = 0, world_size: int = 1) -> float | None:
    """Peak TFLOP/s of one device: ``log.peak_tflops``, the GPU table, or on CPU the GEMM peak of
    this rank's threads (:func:`cpu_peak_tflops_on_ranks`: every rank must call this together).
    An unknown GPU warns once and gives None (no MFU): a CPU peak means nothing there."""
    if override is not None:
        return override
    if device.type != "cuda":
        return cpu_peak_tflops_on_ranks(rank, world_size)
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_tflops(name, precision, tf32=torch.backends.cuda.matmul.allow_tf32)
    if peak is None and name not in _warned_unknown:
        _warned_unknown.add(name)
        log.warning("no peak TFLOP/s known for GPU %r at %s: MFU is not reported; set "
                    "log.peak_tflops to the dense peak of one GPU", name, precision)
    return peak


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


def model_state_bytes(engine: Any) -> int:
    """Bytes of weights, gradients and optimizer state this rank holds (deduplicated storages).

    Counts ZeRO-3 partitions (``ds_tensor``) instead of the gathered parameters, and the flat
    fp32 partitions and moments the ZeRO optimizer keeps.
    """
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel() > 0 and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", p))
        add(p.grad)
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in opt.param_groups:
        for p in group["params"]:
            add(p)
            add(p.grad)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    for name in ("averaged_gradients", "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat",
                 "grad_partitions_flat_buffer", "single_partition_of_fp32_groups"):
        obj = getattr(engine.optimizer, name, None)
        if obj is None:
            continue
        values = obj.values() if isinstance(obj, dict) else [obj] if isinstance(obj, torch.Tensor) else obj
        for item in values:
            for t in item if isinstance(item, (list, tuple)) else [item]:
                add(t)
    return sum(seen.values())


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops_per_device: float | None,
        devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None when the
    peak is unknown)."""
    if not peak_tflops_per_device:
        return None
    return tokens_per_second * flops_per_token / (peak_tflops_per_device * 1e12 * devices)


def process_start_time() -> float:
    """When this process started (epoch seconds), so that start-up counts its imports too."""
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return time.time()


class StartupClock:
    """Where a run's start-up goes: seconds from the process's start to each phase's end.

    ``mark(phase)`` closes ``phase`` now; :meth:`summary` gives the start-up line the trainer
    logs before its first step (``bench/startup.py`` reads it).
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = process_start_time() if start is None else start
        self.marks: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def seconds(self) -> float:
        """Seconds since the process started."""
        return time.time() - self.start

    def phases(self) -> list[tuple[str, float]]:
        """(phase, seconds) in order; the first phase starts at the process's start."""
        out, last = [], self.start
        for phase, at in self.marks:
            out.append((phase, at - last))
            last = at
        return out

    def summary(self) -> str:
        parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases())
        return f"start-up: {self.seconds():.1f} s from process start to the first step ({parts})"
