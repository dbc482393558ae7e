"""Write the model directory of a checkpoint from its DeepSpeed files, one tensor at a time.

    python launcher/consolidate.py <run dir | checkpoint dir> [--step N] [--out DIR] [--max-shard-size 2GB]

Saves write only each rank's shards; the model directory (safetensors weights, config,
tokenizer) that generate, export_hf and finetune read is consolidated from them at the end of a
run, or by this command (any tool given a run or checkpoint directory also does it on demand).
Default output: ``<checkpoint>/model`` (with its own COMPLETE.json); ``--out`` writes elsewhere,
e.g. when the run directory is read-only. Memory: the largest tensor plus one output shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import UserError


def _build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="run directory (its newest complete checkpoint) or checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of this step in a run directory")
    parser.add_argument("--out", type=Path, default=None, help="directory to write (default: <checkpoint>/model)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest weights file (e.g. 2GB, 500MB)")


def checkpoint_of(path: Path, step: int | None) -> Path:
    """The checkpoint directory meant by a run or checkpoint directory (and ``--step``)."""
    from crucible.run_layout import MARKER, marked_checkpoints, step_of
    from training.checkpoint import tag_for

    if step_of(path) is not None:
        if step is not None and step_of(path) != step:
            raise UserError(f"{path} is the checkpoint of step {step_of(path)}, not --step {step}")
        found = path
    else:
        marked = marked_checkpoints(path)
        if step is not None:
            marked = [c for c in marked if c.name == tag_for(step)]
        if not marked:
            raise UserError(f"{path} holds no complete checkpoint{'' if step is None else f' of step {step}'} "
                            "(expected <run_dir>/checkpoints/step_NNNNNNNN with COMPLETE.json)")
        found = marked[0]
    if not (found / MARKER).is_file():
        raise UserError(f"{found} is not a complete checkpoint (no {MARKER}: its save did not finish)")
    return found


def _run(args: argparse.Namespace) -> int:
    from launcher.export_hf import parse_size
    from model.io import consolidate_checkpoint

    if not args.path.is_dir():
        raise UserError(f"{args.path} is not a directory (pass a run directory or a checkpoint directory)")
    ckpt_dir = checkpoint_of(args.path, args.step)
    out = consolidate_checkpoint(ckpt_dir, args.out, max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/consolidate.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
