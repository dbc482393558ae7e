"""Multi-rank test helpers: run a function on N CPU ranks over gloo, or a script under the
``deepspeed`` launcher, with a timeout and per-rank logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


SHM_PATTERN = "deepspeed_allreduce_buffer_*"


def remove_orphan_shm_segments() -> list[str]:
    """Unlink DeepSpeed CPU all-reduce segments in /dev/shm that no live process maps: ranks that
    were SIGKILLed (as fault tests do) never run the trainer's clean-up, and each segment holds
    ~70 MB of memory until reboot. A segment some process still maps (a run in progress, even one
    whose peers have not opened it yet) is left alone."""
    shm = Path("/dev/shm")
    candidates = {str(p) for p in shm.glob(SHM_PATTERN)} if shm.is_dir() else set()
    if not candidates:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
        mapped.update(line.split(None, 5)[-1].removesuffix(" (deleted)") for line in text.splitlines()
                      if "/dev/shm/" in line)
    orphans = sorted(candidates - mapped)
    for path in orphans:
        Path(path).unlink(missing_ok=True)
    return orphans


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined over gloo.

    ``fn`` must be importable (module level). Returns the per-rank results in rank order;
    raises with every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


@dataclass
class LaunchResult:
    returncode: int
    stdout: str
    rank_logs: dict[int, str]
    log_dir: Path

    def check(self) -> LaunchResult:
        if self.returncode != 0:
            raise AssertionError(f"launch failed with {self.returncode}:\n{self.describe()}")
        return self

    def describe(self) -> str:
        parts = [self.stdout[-6000:]]
        for rank, text in sorted(self.rank_logs.items()):
            parts.append(f"--- rank {rank} log (tail) ---\n{text[-4000:]}")
        return "\n".join(parts)


def cpu_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra or {})
    return env


def _read_rank_logs(log_dir: Path) -> dict[int, str]:
    logs: dict[int, str] = {}
    for path in sorted(log_dir.rglob("*.log")):
        digits = "".join(c for c in path.stem.rsplit("rank", 1)[-1] if c.isdigit())
        if digits:
            logs[int(digits)] = logs.get(int(digits), "") + path.read_text(errors="replace")
    return logs


def run_deepspeed(
    script: str | Path,
    args: list[str],
    num_gpus: int = 2,
    timeout: float = 600,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run ``deepspeed --num_gpus N script args`` on CPU and capture output and per-rank logs.

    Per-rank logs come from the launcher's ``--enable_each_rank_log`` (one file per rank
    under ``log_dir``). On timeout the whole process group is killed and the test fails with
    what was captured so far.
    """
    log_dir = Path(log_dir or ROOT / "runs" / "test-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(VENV_BIN / "deepspeed"), "--num_gpus", str(num_gpus),
        "--master_port", str(free_port()), "--enable_each_rank_log", str(log_dir),
        str(script), *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cpu_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        result = LaunchResult(-9, out, _read_rank_logs(log_dir), log_dir)
        raise AssertionError(f"deepspeed run timed out after {timeout}s:\n{result.describe()}")
    return LaunchResult(proc.returncode, out, _read_rank_logs(log_dir), log_dir)
