"""Time to the first training step of the 2-rank ``cpu-small`` demo run (configs/pretrain/cpu_demo.yaml).

Starts ``deepspeed --num_gpus 2 launcher/pretrain.py --config configs/pretrain/cpu_demo.yaml`` for
two steps on token shards of sequence length 256 (built from data/sample once, under a temporary
folder unless ``--manifest`` names shards) and reads rank 0's console line by line as it comes:

* ``launch to first step``: wall seconds from starting the ``deepspeed`` command to rank 0's
  ``training <run_dir>: ...`` line, logged just before the first step (includes the launcher's
  own start-up: the runner and ``launch.py`` each import DeepSpeed before the ranks start);
* the trainer's own ``start-up:`` line, when it logs one: seconds from the rank's process start
  to the first step, by phase.

Repeats the launch ``--repeats`` times and prints each run and the median. The first launch
after a reboot also pays the cold file cache; the CPU peak cache (``CRUCIBLE_CACHE_DIR``) is
pointed at a fresh folder per run unless ``--warm-peak-cache`` is given, so the measurement of
the peak is counted as a first run on a machine would count it.

    python bench/startup.py                      # 3 launches, fresh peak cache each
    python bench/startup.py --repeats 5 --warm-peak-cache
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
ROOT = Path(_HERE).parent
sys.path.insert(0, str(ROOT))

RECIPE = "configs/pretrain/cpu_demo.yaml"
FIRST_STEP = re.compile(r"INFO crucible\.training\.trainer: training ")
STARTUP = re.compile(r"start-up: (?P<total>[0-9.]+) s from process start to the first step \((?P<phases>[^)]*)\)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_once(run_dir: Path, manifest: Path, cache_dir: Path, threads: int) -> tuple[float, str | None]:
    """Seconds from starting the launcher to rank 0's first step, and the trainer's start-up line."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           "launcher/pretrain.py", "--config", RECIPE, f"run_dir={run_dir}", f"data.manifests=[{manifest}]",
           "train.max_steps=2", "checkpoint.every=0", "checkpoint.write_model_dir=false",
           "train.eval_every=0", "train.eval_batches=1", "log.every=1", "log.tensorboard=false"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", CRUCIBLE_CACHE_DIR=str(cache_dir),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, startup, tail = None, None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if first_step is None and FIRST_STEP.search(line):
            first_step = time.perf_counter() - start
        if startup is None and (m := STARTUP.search(line)):
            startup = m.group(0)
    if proc.wait() != 0 or first_step is None:
        sys.exit(f"the run failed (exit {proc.returncode}); its last lines:\n{''.join(tail)}")
    return first_step, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=None, help="token shards (default: built from data/sample)")
    parser.add_argument("--repeats", type=int, default=3, help="launches to time (median printed)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    parser.add_argument("--warm-peak-cache", action="store_true",
                        help="share one CPU peak cache over the launches (only the first measures)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crucible-startup-") as tmp:
        work = Path(tmp)
        manifest = args.manifest
        if manifest is None:
            from tests.datasets import make_token_dataset

            manifest = make_token_dataset(work / "tokens", seq_len=256)
        times = []
        for i in range(args.repeats):
            cache = work / ("peak-cache" if args.warm_peak_cache else f"peak-cache-{i}")
            seconds, startup = launch_once(work / f"run{i}", manifest, cache, args.threads)
            times.append(seconds)
            print(f"launch {i + 1}: {seconds:.1f} s from the deepspeed command to the first step"
                  + (f"; rank 0 {startup}" if startup else ""), flush=True)
        print(f"median launch to first step: {statistics.median(times):.1f} s over {len(times)} launches "
              f"(2 ranks, cpu-small, {args.threads} thread(s) per rank)")


if __name__ == "__main__":
    main()
