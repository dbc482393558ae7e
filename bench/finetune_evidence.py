"""Does pretraining help? Fine-tune the same model from the pretrained checkpoint and from
random initialisation with the same recipe, over several seeds, and print mean +- std, the
difference, the seed spread and whether the difference exceeds it.

    python bench/finetune_evidence.py --pretrained runs/transfer/pretrain --out runs/transfer/evidence \
        [--seeds 0 1 2] [--steps 200] [--set optim.lr=1e-3]

Runs ``launcher/finetune.py`` (one process per run, CPU) on the bundled UCI sentiment and
wikigold NER recipes (configs/finetune/uci_sentiment.yaml, wikigold.yaml). Both inits get the
identical command line; only ``init=pretrained|random`` differs (random: same architecture and
tokenizer, fresh weights). Every run is written under --out/<task>/<init>_seed<N>; a run whose
``metrics.json`` exists is not run again, so an interrupted benchmark resumes where it stopped.

Verdict per task: the pretrained mean beats the random mean by more than the seed spread,
``mean_pretrained - mean_random > max(std_pretrained, std_random)`` (sample standard deviations
over the seeds); the table also says whether the seeds are separated (every pretrained seed
above every random seed), a stricter reading. The summary JSON (--out/summary.json) holds every
value, the rule and the exact fine-tune overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# task -> (test metric, extra overrides applied to both inits)
TASKS = {"uci_sentiment": ("accuracy", []), "wikigold": ("f1", ["task.max_length=128"])}
INITS = ("pretrained", "random")
RULE = "mean_pretrained - mean_random > max(std_pretrained, std_random)"


def overrides(task: str, args: argparse.Namespace) -> list[str]:
    """The fine-tune command line shared by both inits (everything but init, run_dir and seed)."""
    return [f"init_from={args.pretrained}", f"train.max_steps={args.steps}", "train.zero_stage=0",
            "train.eval_every=0", "checkpoint.write_model_dir=false", "log.tensorboard=false",
            *TASKS[task][1], *args.set]


def run_one(task: str, init: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = args.out / task / f"{init}_seed{seed}"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "launcher/finetune.py", "--config", f"configs/finetune/{task}.yaml",
               f"init={init}", f"run_dir={run_dir}", f"train.seed={seed}", *overrides(task, args)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        if not metrics.is_file():
            raise SystemExit(f"run finished without writing {metrics}: {' '.join(cmd)}")
        print(f"  {task} {init} seed {seed}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(metrics.read_text())


def compare(values: dict[str, list[float]]) -> dict:
    """Mean, sample std, difference, spread and the two verdicts for one task."""
    row: dict = {}
    for init in INITS:
        v = values[init]
        row[init] = {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
    diff = row["pretrained"]["mean"] - row["random"]["mean"]
    spread = max(row["pretrained"]["std"], row["random"]["std"])
    row.update(difference=diff, spread=spread, beyond_spread=diff > spread,
               separated=min(values["pretrained"]) > max(values["random"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, default=Path("runs/transfer/pretrain"),
                        help="pretraining run directory (its newest complete checkpoint, model shape and tokenizer)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="fine-tune steps, the same for both inits")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_evidence"))
    parser.add_argument("--jobs", type=int, default=1, help="fine-tune processes at a time (results do not depend on it)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra fine-tune overrides for both inits, e.g. optim.lr=1e-3")
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS),
                        help="run only these inits (e.g. the random baselines while the pretraining still "
                             "runs: they read only its model shape and tokenizer); the table needs both")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds: give at least two seeds; the verdict needs a seed spread")
    if not args.pretrained.is_dir():
        parser.error(f"--pretrained {args.pretrained}: no such run directory; pretrain first "
                     "(e.g. configs/pretrain/cpu_transfer.yaml, see README 'Does pretraining help?')")

    jobs = [(task, init, seed) for task in args.tasks for init in args.inits for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run_one(*j, args), jobs)))
    if set(args.inits) != set(INITS):
        print(f"ran {len(jobs)} {'/'.join(args.inits)} runs under {args.out}; run again without --inits for the table")
        return

    summary: dict = {"pretrained": str(args.pretrained), "steps": args.steps, "seeds": args.seeds, "set": args.set,
                     "rule": RULE, "tasks": {}}
    print(f"{'task':<14}{'metric':<9}{'pretrained':>17}{'random init':>17}{'diff':>8}{'spread':>8}"
          f"{'majority':>10}  beyond spread / separated")
    for task in args.tasks:
        metric = TASKS[task][0]
        values = {init: [results[(task, init, s)]["test"][metric] for s in args.seeds] for init in INITS}
        row = compare(values)
        majority = results[(task, "pretrained", args.seeds[0])]["test"].get("majority_rate")
        summary["tasks"][task] = {"metric": metric, **row, "majority_rate": majority,
                                  "overrides": overrides(task, args)}
        fmt = lambda r: f"{r['mean']:.3f} +- {r['std']:.3f}"
        shown = "-" if majority is None else f"{majority:.3f}"
        verdict = f"{'yes' if row['beyond_spread'] else 'no'} / {'yes' if row['separated'] else 'no'}"
        print(f"{task:<14}{metric:<9}{fmt(row['pretrained']):>17}{fmt(row['random']):>17}"
              f"{row['difference']:>+8.3f}{row['spread']:>8.3f}{shown:>10}  {verdict}", flush=True)
    print(f"(test split; {args.steps} steps{''.join(' ' + o for o in args.set)}, seeds {' '.join(map(str, args.seeds))}; rule: {RULE}; "
          "separated: every pretrained seed above every random seed)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
