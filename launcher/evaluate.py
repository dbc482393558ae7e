"""Evaluate a model on lm-evaluation-harness tasks.

    python launcher/evaluate.py --model <run dir | model dir | HF dir> --tasks crucible_sentiment,crucible_udhr_completion --output runs/eval/tiny
    python launcher/evaluate.py --model runs/cpu_tiny --tasks hellaswag,arc_easy --limit 200 --output runs/eval/cpu_tiny
    python launcher/evaluate.py --model runs/cpu_tiny --tasks my_task --include-path my_tasks/ --output runs/eval/mine

Scores our model directly (log-likelihoods batched, generation with our KV cache), on CPU or one
GPU (--device cuda). Writes the harness's results JSON (<output>/results.json), the per-item
samples with --log-samples, and TensorBoard scalars eval/<task>/<metric> (<output>/tensorboard,
at the checkpoint's step). The bundled tasks (data/sample/eval) and task files in --include-path
folders need no network; standard tasks download their data from the Hugging Face hub, or read
the datasets cache when HF_DATASETS_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import UserError

_STEP = re.compile(r"^step_(\d+)$")


def _build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory, Hugging Face Llama directory, or run directory (its latest model)")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated harness task or group names (bundled: crucible_sentiment, "
                             "crucible_udhr_completion)")
    parser.add_argument("--output", type=Path, required=True,
                        help="directory for results.json, samples and TensorBoard scalars")
    parser.add_argument("--include-path", action="append", default=[], type=Path, metavar="DIR",
                        help="folder of your own task YAML files (repeatable)")
    parser.add_argument("--limit", type=float, default=None,
                        help="items per task: a count, or a fraction below 1 (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (one device)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast the weights (default: as stored)")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write every item's prompt, answers and score (samples_<task>.jsonl)")
    parser.add_argument("--step", type=int, default=None,
                        help="TensorBoard step of the scalars (default: the checkpoint's step, else 0)")


def checkpoint_step(model_dir: Path) -> int:
    """The step of the checkpoint a model directory belongs to (``.../step_00000200/model``), else 0."""
    for part in (model_dir.resolve(), *model_dir.resolve().parents):
        match = _STEP.match(part.name)
        if match:
            return int(match.group(1))
    return 0


def _run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive (got {args.batch_size})")
    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit must be a positive count or fraction (got {args.limit:g})")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0 (got {args.num_fewshot})")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is visible; use --device cpu")

    from crucible.runtime import setup_logging
    from model.io import find_model_dir
    from training.harness_eval import (
        evaluate_tasks,
        results_table,
        scalar_metrics,
        task_manager,
        write_results,
    )

    setup_logging("INFO")
    model_dir = find_model_dir(args.model)
    manager = task_manager(tasks, args.include_path)  # unknown names fail before the model loads

    from training.callbacks.metrics import TensorBoardWriter
    from training.harness_lm import CrucibleLM

    lm = CrucibleLM.from_model_dir(str(model_dir), device=args.device, dtype=args.dtype,
                                   batch_size=args.batch_size)
    results = evaluate_tasks(lm, tasks, args.include_path, limit=args.limit,
                             num_fewshot=args.num_fewshot, log_samples=args.log_samples, manager=manager)
    results.setdefault("config", {})["model_dir"] = str(model_dir)
    path = write_results(results, args.output)
    step = args.step if args.step is not None else checkpoint_step(model_dir)
    board = TensorBoardWriter(args.output / "tensorboard", enabled=True)
    board.scalars(step, scalar_metrics(results))
    board.close()
    print(results_table(results))
    print(f"wrote {path} and TensorBoard scalars (step {step}) under {args.output / 'tensorboard'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/evaluate.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
