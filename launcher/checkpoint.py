"""Offline checkpoint tools: the universal conversion a resume on another rank count needs.

    python launcher/checkpoint.py universal runs/x/pretrain                 # newest whole checkpoint
    python launcher/checkpoint.py universal runs/x/pretrain --step 250 --workers 8
    python launcher/checkpoint.py universal runs/x/pretrain/checkpoints/step_00000250
    python launcher/checkpoint.py list runs/x/pretrain

``universal`` converts a ZeRO 1-3 checkpoint to DeepSpeed's universal format in
``<checkpoint>/universal`` (``ds_to_universal`` with ``--workers`` parallel extract and merge
processes), which a run on another number of ranks then loads; such a resume stops at once
with this command when the conversion is missing, because the conversion reads and writes
every optimizer shard (12 bytes a parameter) and must not run inside a training job, behind its
collective timeout. Without ``--step`` the newest whole checkpoint is taken, skipping damaged
ones with a warning, as ``checkpoint.resume=auto`` does; a damaged checkpoint asked for by name
is refused. A whole earlier conversion is reused; a damaged one is made again. A ZeRO-0
checkpoint holds the full weights in every rank's file and resumes on any rank count as it is:
there is nothing to convert.

``list`` prints each checkpoint of a run: step, ranks, ZeRO stage, whether it is whole (the
cheap checks: marker, JSON files, file sizes) and whether a whole universal conversion exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import UserError
from crucible.run_layout import CHECKPOINTS, MARKER, step_of


def default_workers() -> int:
    """min(8, CPU count): each worker holds one parameter's fragments at a time, and past 8
    the conversion is bound by the disk, not the CPUs."""
    return max(1, min(8, os.cpu_count() or 1))


def _build_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="{universal,list}")
    uni = sub.add_parser("universal", help="convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format",
                         description="convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format "
                                     "(<checkpoint>/universal), for a resume on another number of ranks")
    uni.add_argument("path", type=Path, metavar="RUN_DIR|CHECKPOINT_DIR",
                     help="a run directory (its newest whole checkpoint, or --step) or one "
                          "checkpoints/step_NNNNNNNN directory")
    uni.add_argument("--step", type=int, default=None,
                     help="the checkpoint of this step in the run directory (default: the newest whole one)")
    uni.add_argument("--workers", type=int, default=default_workers(),
                     help="parallel extract and merge processes (default: min(8, CPU count), here "
                          f"{default_workers()})")
    lst = sub.add_parser("list", help="the checkpoints of a run directory",
                         description="step, ranks, ZeRO stage, whole or damaged, universal conversion")
    lst.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")


def _candidates(path: Path, step: int | None) -> tuple[Path, list[Path], bool]:
    """The run directory, the checkpoints to try in order, and whether one was named (the
    checkpoint directory itself, or --step)."""
    from training import checkpoint as ckpt

    if not path.is_dir():
        raise UserError(f"{path} is not a directory: pass a run directory or one of its "
                        f"{CHECKPOINTS}/step_NNNNNNNN directories")
    if step_of(path) is not None:
        if step is not None and step != step_of(path):
            raise UserError(f"--step {step} contradicts the checkpoint directory {path} (step "
                            f"{step_of(path)}); pass the run directory with --step, or the checkpoint alone")
        return path.parent.parent, [path], True
    if not (path / CHECKPOINTS).is_dir():
        raise UserError(f"{path} has no {CHECKPOINTS}/ directory: it is not a run directory of "
                        "launcher/pretrain.py or launcher/finetune.py (pass the run_dir of the run)")
    if step is None:
        return path, ckpt.resume_candidates(path, "auto"), False
    chosen = ckpt.checkpoint_root(path) / ckpt.tag_for(step) if step >= 0 else None
    if chosen is None or not chosen.is_dir():
        have = ", ".join(str(c.step) for c in ckpt.list_checkpoints(path, complete_only=False)) or "none"
        raise UserError(f"{path} has no checkpoint of step {step} (steps there: {have})")
    return path, [chosen], True


def universal(args: argparse.Namespace) -> int:
    from training import checkpoint as ckpt

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: the conversion needs at least 1 worker process")
    run_dir, candidates, named = _candidates(args.path, args.step)
    problems: dict[str, str] = {}

    def check(path: Path) -> str | None:
        problem = ckpt.checkpoint_problem(path) or ckpt.torch_files_problem(path)
        if problem:
            problems[path.name] = problem
        return problem

    try:  # the resume's own selection: the newest whole checkpoint, damaged ones skipped
        info = ckpt.select_checkpoint(candidates, named, check)
    except UserError:
        found = "; ".join(f"{tag}: {problem}" for tag, problem in problems.items())
        raise UserError(
            f"cannot convert: {found}; "
            + ("convert another checkpoint (--step, see `launcher/checkpoint.py list`) or omit "
               "--step to take the newest whole one" if named else
               "every checkpoint of the run is damaged, so no resume can use any of them")
        ) from None
    if info is None:
        raise UserError(f"{run_dir} has no complete checkpoint (none with {MARKER} in "
                        f"{ckpt.checkpoint_root(run_dir)}); there is nothing to convert")
    zero_stage = int(info.marker.get("zero_stage", 0) or 0)
    world = info.marker.get("world_size")
    if zero_stage == 0:
        raise UserError(
            f"checkpoint {info.path} was saved with ZeRO stage 0: every rank's file holds the full "
            "weights and optimizer state, so it resumes on any number of ranks as it is; there is "
            "nothing to convert"
        )
    out = info.path / ckpt.UNIVERSAL
    if ckpt.universal_problem(info.path) is None:
        print(f"{info.tag} (step {info.step}, saved on {world} ranks, ZeRO-{zero_stage}) is already "
              f"converted: {out} is whole; nothing to do")
        return 0
    print(f"converting {info.tag} (step {info.step}, saved on {world} ranks, ZeRO-{zero_stage}) to "
          f"{out} with {args.workers} worker{'s' if args.workers != 1 else ''}", flush=True)
    start = time.perf_counter()
    ckpt.convert_to_universal(info.path, workers=args.workers)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"converted {info.tag} in {seconds:.1f} s with {args.workers} worker"
          f"{'s' if args.workers != 1 else ''}: {out} ({size / 2**20:.1f} MiB)")
    print(f"a run on another number of ranks now resumes from it (checkpoint.resume=auto takes the "
          f"newest checkpoint; this one is checkpoint.resume={info.tag})")
    return 0


def list_run(args: argparse.Namespace) -> int:
    from training import checkpoint as ckpt

    run_dir = args.run_dir
    if not (run_dir / CHECKPOINTS).is_dir():
        raise UserError(f"{run_dir} has no {CHECKPOINTS}/ directory: it is not a run directory of "
                        "launcher/pretrain.py or launcher/finetune.py")
    found = ckpt.list_checkpoints(run_dir, complete_only=False)
    if not found:
        print(f"{run_dir}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'ranks':>5}  {'zero':>4}  {'universal':9}  state")
    for info in found:
        problem = ckpt.checkpoint_problem(info.path)
        zero = info.marker.get("zero_stage", "?")
        if problem is not None or zero == 0:
            conversion = "-"
        else:
            conversion = "whole" if ckpt.universal_problem(info.path) is None else (
                "damaged" if (info.path / ckpt.UNIVERSAL).exists() else "no")
        print(f"{info.step:>10}  {info.marker.get('world_size', '?'):>5}  {zero:>4}  {conversion:9}  "
              f"{'whole' if problem is None else problem}")
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return universal(args) if args.command == "universal" else list_run(args)


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, run, prog="launcher/checkpoint.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
