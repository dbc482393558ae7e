"""Measurements for the training metrics: device peak for MFU, peak memory, model-state bytes.

The metrics of a step (``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_second``, ``train/mfu``, ``train/data_wait_fraction``, ``train/step_time``,
``train/memory_gb``, ``train/skipped_steps``; ``val/loss``, ``val/perplexity`` or ``dev/...``;
``checkpoint/save_seconds``) are built by the loop and written by
:class:`training.callbacks.metrics.MetricsLogger`.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import torch

log = logging.getLogger("crucible.training.metrics")

# Dense peak TFLOP/s per GPU by precision (vendor datasheets, no sparsity). Matched by substring
# of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" is listed before "H100").
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A10G", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
]


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


def device_peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float:
    """Peak TFLOP/s of one device: the override, the GPU table, or a measured CPU GEMM peak."""
    if override is not None:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS:
            if key in name and peaks.get(precision):
                return peaks[precision]
        log.warning("unknown GPU %r: MFU uses a measured GEMM peak; set log.peak_tflops to fix", name)
        return measure_cpu_gemm_tflops(4096, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    return measure_cpu_gemm_tflops()


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


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    peak = peak_tflops_per_device * 1e12 * devices
    return tokens_per_second * flops_per_token / peak if peak > 0 else 0.0
