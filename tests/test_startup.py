"""Start-up of a run: the cached CPU peak behind CPU MFU, the start-up clock, the NCCL defaults and
the checkpoint directory checked on every rank before the first step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.harness import run_on_ranks
from training.engine import NCCL_ENV_DEFAULTS, set_nccl_env_defaults
from training.metrics import StartupClock, cache_dir, cached_cpu_peak_tflops, cpu_peak_key


def _never_measure() -> float:
    raise AssertionError("measured although the peak was cached")


def test_cpu_peak_measured_once_then_read_from_the_cache(tmp_path):
    cache = tmp_path / "peaks.json"
    calls = []

    def measure() -> float:
        calls.append(torch.get_num_threads())
        return 0.125

    assert cached_cpu_peak_tflops(1, cache_file=cache, measure=measure) == 0.125
    assert calls == [1]  # measured with the rank's thread count
    assert cached_cpu_peak_tflops(1, cache_file=cache, measure=_never_measure) == 0.125
    assert list(json.loads(cache.read_text())) == [cpu_peak_key(1)]


def test_cpu_peak_cache_is_keyed_by_threads_and_dtype(tmp_path):
    cache = tmp_path / "peaks.json"
    cached_cpu_peak_tflops(1, cache_file=cache, measure=lambda: 0.1)
    assert cached_cpu_peak_tflops(2, cache_file=cache, measure=lambda: 0.2) == 0.2
    assert cached_cpu_peak_tflops(1, torch.bfloat16, cache_file=cache, measure=lambda: 0.3) == 0.3
    assert cached_cpu_peak_tflops(1, cache_file=cache, measure=_never_measure) == 0.1
    key = cpu_peak_key(2)
    assert "2 threads" in key and "float32" in key and torch.__version__ in key
    assert len(json.loads(cache.read_text())) == 3


def test_a_damaged_cpu_peak_cache_is_measured_again(tmp_path):
    cache = tmp_path / "peaks.json"
    cache.write_text("{not json")
    assert cached_cpu_peak_tflops(1, cache_file=cache, measure=lambda: 0.5) == 0.5
    assert json.loads(cache.read_text())[cpu_peak_key(1)]["tflops"] == 0.5


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CRUCIBLE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CRUCIBLE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "crucible"


def test_startup_clock_phases_add_up_and_match_the_bench():
    clock = StartupClock(start=100.0)
    clock.marks = [("imports and config", 103.0), ("process group", 104.5)]
    assert clock.phases() == [("imports and config", 3.0), ("process group", 1.5)]
    bench = Path(__file__).resolve().parent.parent / "bench" / "startup.py"
    pattern = re.search(r'STARTUP = re\.compile\(r"(.*)"\)', bench.read_text()).group(1)
    assert re.search(pattern, clock.summary())


def test_nccl_defaults_leave_exported_values_alone():
    env = {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    added = set_nccl_env_defaults(env)
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == NCCL_ENV_DEFAULTS["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
    assert set(added) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def _checks_on_ranks(rank: int, world_size: int, root: str) -> dict:
    from crucible.errors import UserError
    from training.collectives import barrier
    from training.engine import check_writable_on_every_rank
    from training.metrics import cpu_peak_tflops_on_ranks

    root_path = Path(root)
    out: dict = {}
    shared = root_path / "shared" / "checkpoints"
    check_writable_on_every_rank(shared, rank, world_size)
    barrier()  # every rank has removed its probe
    out["probes_left"] = sorted(p.name for p in shared.iterdir())
    cases = {
        # rank 1's directory lies under a regular file: it cannot be created
        "unwritable": root_path / ("file" if rank == 1 else "ok") / "checkpoints",
        # each rank has its own directory, as node-local disks on two nodes would be
        "not_shared": root_path / f"local{rank}" / "checkpoints",
    }
    for name, directory in cases.items():
        try:
            check_writable_on_every_rank(directory, rank, world_size)
            out[name] = None
        except UserError as exc:
            out[name] = str(exc)
    out["peak"] = cpu_peak_tflops_on_ranks(rank, world_size)
    return out


@pytest.mark.distributed
def test_checkpoint_dir_checked_on_every_rank_and_peak_shared(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setenv("CRUCIBLE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cpu_peak_tflops.json").write_text(
        json.dumps({cpu_peak_key(1): {"tflops": 0.0625}}))  # the ranks run 1 thread: no measurement
    results = run_on_ranks(_checks_on_ranks, 2, str(tmp_path), timeout=120)
    for result in results:
        assert result["probes_left"] == []
        unwritable, not_shared = result["unwritable"], result["not_shared"]
        assert unwritable.startswith("checkpoint directory not usable: rank 1 on host ")
        assert f"cannot write to {tmp_path / 'file' / 'checkpoints'}" in unwritable and "\n" not in unwritable
        assert "does not see the probe files of rank(s)" in not_shared and "not shared storage" in not_shared
        assert result["peak"] == 0.0625
