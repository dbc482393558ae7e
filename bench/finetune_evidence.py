"""Does pretraining help? Fine-tune the same model from the pretrained checkpoint and from
random initialisation with the same budget, over several seeds, and print mean +- std.

    python bench/finetune_evidence.py --pretrained runs/demo/pretrain [--seeds 0 1 2] [--steps 150]

Runs ``launcher/finetune.py`` (one process per run, CPU) on the bundled UCI sentiment and
wikigold NER recipes; writes every run under --out and a summary JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"uci_sentiment": ("accuracy", []), "wikigold": ("f1", ["task.max_length=128"])}


def run_one(task: str, init: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    run_dir = args.out / task / f"{init}_seed{seed}"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "launcher/finetune.py", "--config", f"configs/finetune/{task}.yaml",
               f"init_from={args.pretrained}", f"init={init}", f"run_dir={run_dir}",
               f"train.seed={seed}", f"train.max_steps={args.steps}", "train.zero_stage=0",
               "train.eval_every=0", "checkpoint.write_model_dir=false", "log.tensorboard=false", *extra]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, default=Path("runs/demo/pretrain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_evidence"))
    args = parser.parse_args()
    summary: dict = {}
    print(f"{'task':<15}{'metric':<10}{'pretrained':>20}{'random init':>20}{'majority':>10}")
    for task in args.tasks:
        metric, extra = TASKS[task]
        row = {}
        for init in ("pretrained", "random"):
            values = [run_one(task, init, s, args, extra)["test"][metric] for s in args.seeds]
            row[init] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "values": values}
        majority = run_one(task, "pretrained", args.seeds[0], args, extra)["test"].get("majority_rate")
        summary[task] = {"metric": metric, **row, "majority_rate": majority, "steps": args.steps, "seeds": args.seeds}
        fmt = lambda r: f"{r['mean']:.3f} +- {r['std']:.3f}"
        shown = "-" if majority is None else f"{majority:.3f}"
        print(f"{task:<15}{metric:<10}{fmt(row['pretrained']):>20}{fmt(row['random']):>20}{shown:>10}",
              flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
