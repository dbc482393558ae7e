"""The whole mission in miniature on the bundled sample: clean -> tokenizer -> token shards ->
2-rank DeepSpeed pretraining (CPU, ZeRO-2) -> sentiment fine-tune -> Hugging Face export ->
generation -> run report.

    python launcher/demo.py [--run-dir runs/demo] [--pretrain-steps 200] [--finetune-steps 150]

Each stage prints one line with its result; its full output goes to <run-dir>/logs/<stage>.log.
A stage whose output is already complete (and made by the same command) is reused. A failing
stage names itself and its log, and the demo exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The government said on Tuesday that", "Scientists have found", "The weather in Sydney"]


@dataclass
class Stage:
    name: str
    command: list[str]
    done: Callable[[], bool]
    summary: Callable[[], str]
    env: dict[str, str] = field(default_factory=dict)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def build_stages(run: Path, args: argparse.Namespace) -> list[Stage]:
    py, ds = sys.executable, str(Path(sys.executable).parent / "deepspeed")
    data, pre, ft, hf = run / "data", run / "pretrain", run / "finetune_sentiment", run / "hf"
    data_cfg = "configs/data/sample.yaml"
    vocab = f"tokenizer.vocab_size={args.vocab_size}"

    def shards_summary() -> str:
        m = _json(data / "shards" / "manifest.json")
        return (f"{m['totals']['train']['samples']} train samples of {m['seq_len']} tokens, "
                f"{m['totals']['validation']['samples']} validation")

    def pretrain_done() -> bool:
        latest = pre / "latest.json"
        return latest.is_file() and _json(latest).get("step") == args.pretrain_steps

    def pretrain_summary() -> str:
        rows = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if "val/loss" in r]
        first, last = val[0], val[-1]
        return (f"{last['step']} steps; validation loss {first['val/loss']:.3f} (step {first['step']}) -> "
                f"{last['val/loss']:.3f}, perplexity {last['val/perplexity']:.1f}")

    def finetune_done() -> bool:
        m = ft / "metrics.json"
        return m.is_file() and _json(m).get("step") == args.finetune_steps

    def finetune_summary() -> str:
        t = _json(ft / "metrics.json")["test"]
        return (f"test accuracy {t['accuracy']:.3f} (majority class {t['majority_rate']:.3f}), "
                f"macro-F1 {t['macro_f1']:.3f}")

    samples = run / "samples.jsonl"
    return [
        Stage("clean", [py, "launcher/clean.py", "--config", data_cfg, f"output={data / 'clean'}"],
              lambda: (data / "clean" / "_SUCCESS").is_file(),
              lambda: "{kept} of {read} documents kept".format(**_clean_totals(data / "clean"))),
        Stage("tokenizer", [py, "launcher/build_tokenizer.py", "--config", data_cfg, vocab,
                            f"input={data / 'clean'}", f"output={data / 'tokenizer'}"],
              lambda: (data / "tokenizer" / "report.json").is_file(),
              lambda: "vocab {vocab_size}, {bytes_per_token} bytes/token, {tokens_per_word} tokens/word".format(
                  **_json(data / "tokenizer" / "report.json"))),
        Stage("shards", [py, "launcher/shard.py", "--config", data_cfg, vocab, f"input={data / 'clean'}",
                         f"tokenizer_dir={data / 'tokenizer'}", f"output={data / 'shards'}"],
              lambda: (data / "shards" / "manifest.json").is_file(),
              shards_summary),
        Stage("pretrain", [ds, "--num_gpus", "2", "--master_port", str(args.master_port), "launcher/pretrain.py",
                           "--config", "configs/pretrain/cpu_demo.yaml",
                           f"data.manifests=[{data / 'shards' / 'manifest.json'}]", f"run_dir={pre}",
                           f"train.max_steps={args.pretrain_steps}",
                           f"train.eval_every={max(args.pretrain_steps // 4, 1)}",
                           f"checkpoint.every={args.pretrain_steps}"],
              pretrain_done, pretrain_summary, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}),
        Stage("finetune", [ds, "--num_gpus", "2", "--master_port", str(args.master_port + 1),
                           "launcher/finetune.py", "--config", "configs/finetune/uci_sentiment.yaml",
                           f"init_from={pre}", f"run_dir={ft}", f"train.max_steps={args.finetune_steps}",
                           f"train.eval_every={max(args.finetune_steps // 3, 1)}",
                           f"contamination_manifests=[{data / 'shards' / 'manifest.json'}]"],
              finetune_done, finetune_summary, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}),
        Stage("export", [py, "launcher/export_hf.py", "--model", str(pre), "--output", str(hf), "--force"],
              lambda: (hf / "config.json").is_file() and (hf / "model.safetensors").is_file(),
              lambda: f"Hugging Face Llama directory {hf}"),
        Stage("generate", [py, "launcher/generate.py", "--model", str(hf), "--max-new-tokens", "40",
                           "--temperature", "0.8", "--top-p", "0.95", "--seed", "0", "--json",
                           *[a for p in PROMPTS for a in ("--prompt", p)]],
              lambda: samples.is_file(),
              lambda: f"{len(samples.read_text().splitlines())} continuations in {samples}"),
    ]


def _clean_totals(clean: Path) -> dict:
    stats = _json(clean / "stats.json")
    return {"kept": stats["documents_kept"], "read": stats["documents_read"]}


def run_stage(stage: Stage, run: Path, log_dir: Path, force: bool) -> float:
    """Run one stage (or reuse it); returns seconds spent. Raises UserError on failure."""
    stamp = log_dir / f"{stage.name}.cmd"
    command = shlex.join(stage.command)
    if not force and stage.done() and stamp.is_file() and stamp.read_text() == command:
        print(f"[{stage.name:9s}] reused: {stage.summary()}", flush=True)
        return 0.0
    log = log_dir / f"{stage.name}.log"
    start = time.perf_counter()
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {command}\n")
        out.flush()
        proc = subprocess.run(stage.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if stage.name == "generate" and proc.returncode == 0:
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
        (run / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if proc.returncode != 0:
        raise UserError(f"stage '{stage.name}' failed (exit {proc.returncode}); read {log}")
    stamp.write_text(command)
    print(f"[{stage.name:9s}] {seconds:6.0f} s  {stage.summary()}", flush=True)
    return seconds


def _build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="every demo output goes here")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="pretraining steps (cpu-small)")
    parser.add_argument("--finetune-steps", type=int, default=150, help="sentiment fine-tune steps")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size")
    parser.add_argument("--master-port", type=int, default=29611, help="first rendezvous port of the 2-rank stages")
    parser.add_argument("--force", action="store_true", help="rerun every stage even if complete")


def _run(args: argparse.Namespace) -> int:
    from training.report import write_run_report

    run = args.run_dir.resolve()
    log_dir = run / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stages = build_stages(run, args)
    total = time.perf_counter()
    timings = {}
    for stage in stages:
        timings[stage.name] = run_stage(stage, run, log_dir, args.force)
    timings["total"] = time.perf_counter() - total
    report = write_run_report(run, [shlex.join(s.command) for s in stages], timings)
    print(f"[report   ] {report}  (TensorBoard: tensorboard --logdir {run})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/demo.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
