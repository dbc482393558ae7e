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

Hyperparameters chosen per init on dev (``--grid``): every combination of the grid's values
(e.g. ``--grid optim.lr=3e-4,1e-3,3e-3 task.head_lr_multiplier=1,10``) is fine-tuned for every
init and seed (run directories --out/<task>/<setting>/<init>_seed<N>); for each task and init the
setting with the best mean **dev** metric over the seeds is chosen (ties: the first in grid
order), and the table compares the **test** metric of each init's chosen setting. Both inits get
the same budget (steps, batch), the same grid and the same selection rule; the test split plays
no part in the choice. The grid table (dev and test means of every setting) is printed first and
kept in the summary.
"""

from __future__ import annotations

import argparse
import itertools
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


def overrides(task: str, args: argparse.Namespace, setting: tuple[str, ...] = ()) -> list[str]:
    """The fine-tune command line shared by both inits (everything but init, run_dir and seed)."""
    return [f"init_from={args.pretrained}", f"train.max_steps={args.steps}", "train.zero_stage=0",
            "train.eval_every=0", "checkpoint.write_model_dir=false", "log.tensorboard=false",
            *TASKS[task][1], *args.set, *setting]


def parse_grid(items: list[str]) -> list[tuple[str, ...]]:
    """``KEY=V1,V2 ...`` -> every combination as a tuple of ``KEY=V`` overrides (grid order)."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v for v in values.split(",") if v]
        if not sep or not key or not choices:
            raise SystemExit(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. optim.lr=3e-4,1e-3)")
        axes.append([f"{key}={v}" for v in choices])
    return [tuple(combo) for combo in itertools.product(*axes)]


def setting_name(setting: tuple[str, ...]) -> str:
    """The run-directory name of a grid setting ('default' without a grid)."""
    return ",".join(setting) if setting else "default"


def run_one(task: str, init: str, seed: int, args: argparse.Namespace, setting: tuple[str, ...] = ()) -> dict:
    run_dir = args.out / task / (setting_name(setting) if setting else "") / f"{init}_seed{seed}"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "launcher/finetune.py", "--config", f"configs/finetune/{task}.yaml",
               f"init={init}", f"run_dir={run_dir}", f"train.seed={seed}", *overrides(task, args, setting)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        if not metrics.is_file():
            raise SystemExit(f"run finished without writing {metrics}: {' '.join(cmd)}")
        where = f" [{setting_name(setting)}]" if setting else ""
        print(f"  {task}{where} {init} seed {seed}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
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
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="choose these hyperparameters per init on the dev split: every combination is run for "
                             "both inits and all seeds, each init takes its best mean dev setting, the table compares "
                             "their test metrics (e.g. optim.lr=3e-4,1e-3,3e-3 task.head_lr_multiplier=1,10)")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds: give at least two seeds; the verdict needs a seed spread")
    if not args.pretrained.is_dir():
        parser.error(f"--pretrained {args.pretrained}: no such run directory; pretrain first "
                     "(e.g. configs/pretrain/cpu_transfer.yaml, see README 'Does pretraining help?')")

    grid = parse_grid(args.grid) if args.grid else [()]
    jobs = [(task, init, seed, setting) for task in args.tasks for setting in grid
            for init in args.inits for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run_one(*j[:3], args, j[3]), jobs)))
    if set(args.inits) != set(INITS):
        print(f"ran {len(jobs)} {'/'.join(args.inits)} runs under {args.out}; run again without --inits for the table")
        return

    summary: dict = {"pretrained": str(args.pretrained), "steps": args.steps, "seeds": args.seeds, "set": args.set,
                     "rule": RULE, "tasks": {}}
    chosen: dict[tuple[str, str], tuple[str, ...]] = {}
    if args.grid:
        summary["grid"] = args.grid
        summary["selection"] = ("per task and init: the grid setting with the best mean dev metric over the seeds "
                                "(ties: first in grid order); the test metric of that setting is compared")
        print("grid (mean over seeds; dev chooses, test shown for the record)")
        for task in args.tasks:
            metric = TASKS[task][0]
            table = []
            for setting in grid:
                entry = {"setting": list(setting)}
                for init in INITS:
                    runs = [results[(task, init, s, setting)] for s in args.seeds]
                    entry[init] = {"dev": statistics.mean(r["dev"][metric] for r in runs),
                                   "test": statistics.mean(r["test"][metric] for r in runs)}
                table.append(entry)
            for init in INITS:  # max keeps the first of equal values: grid order breaks ties
                best = max(range(len(grid)), key=lambda i: table[i][init]["dev"])
                chosen[(task, init)] = grid[best]
            summary["tasks"][task] = {"grid": table}
            for entry in table:
                setting = tuple(entry["setting"])
                marks = "".join(f" <- {init}" for init in INITS if chosen[(task, init)] == setting)
                cells = "  ".join(f"{init} dev {entry[init]['dev']:.3f} test {entry[init]['test']:.3f}" for init in INITS)
                print(f"  {task:<14}{setting_name(setting):<48}{cells}{marks}")
    else:
        chosen = {(task, init): () for task in args.tasks for init in INITS}

    print(f"{'task':<14}{'metric':<9}{'pretrained':>17}{'random init':>17}{'diff':>8}{'spread':>8}"
          f"{'majority':>10}  beyond spread / separated")
    for task in args.tasks:
        metric = TASKS[task][0]
        values = {init: [results[(task, init, s, chosen[(task, init)])]["test"][metric] for s in args.seeds]
                  for init in INITS}
        row = compare(values)
        majority = results[(task, "pretrained", args.seeds[0], chosen[(task, "pretrained")])]["test"].get("majority_rate")
        record = summary["tasks"].setdefault(task, {})
        record.update(metric=metric, **row, majority_rate=majority)
        if args.grid:
            record["chosen"] = {init: list(chosen[(task, init)]) for init in INITS}
            record["overrides"] = {init: overrides(task, args, chosen[(task, init)]) for init in INITS}
        else:
            record["overrides"] = overrides(task, args)
        fmt = lambda r: f"{r['mean']:.3f} +- {r['std']:.3f}"
        shown = "-" if majority is None else f"{majority:.3f}"
        verdict = f"{'yes' if row['beyond_spread'] else 'no'} / {'yes' if row['separated'] else 'no'}"
        print(f"{task:<14}{metric:<9}{fmt(row['pretrained']):>17}{fmt(row['random']):>17}"
              f"{row['difference']:>+8.3f}{row['spread']:>8.3f}{shown:>10}  {verdict}", flush=True)
        if args.grid:
            print(f"{'':<14}chosen on dev: " + "; ".join(f"{init} {setting_name(chosen[(task, init)])}" for init in INITS))
    print(f"(test split; {args.steps} steps{''.join(' ' + o for o in args.set)}, seeds {' '.join(map(str, args.seeds))}; rule: {RULE}; "
          "separated: every pretrained seed above every random seed"
          + ("; settings chosen per init by mean dev metric" if args.grid else "") + ")")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
