"""Pretrain a Transformer LM with DeepSpeed ZeRO.

    deepspeed --num_gpus 2 launcher/pretrain.py --config configs/pretrain/cpu_tiny.yaml [section.key=value ...]

Also runs under torchrun and as one plain python process.
"""

from __future__ import annotations

import argparse
import sys

from crucible.cli import stage_main
from training.config import PretrainConfig


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate the config and the data manifests, print the DeepSpeed config and per-GPU memory "
             "estimates, and exit (status 2 when the run would stop)",
    )
    parser.add_argument(
        "--world-size", type=int, default=None,
        help="with --dry-run: the number of GPUs to plan for (default: the launcher's WORLD_SIZE, else the "
             "recipe's train.planned_world_size)",
    )
    parser.add_argument(
        "--write-gbps", type=float, default=None,
        help="with --dry-run: write bandwidth per rank in GB/s used to time a checkpoint save "
             "(default 1.0, an assumed figure; measure your storage's)",
    )


def _run(cfg: PretrainConfig, args: argparse.Namespace) -> int:
    from training.pretrain import pretrain  # heavy imports only when training

    return pretrain(cfg, dry_run=args.dry_run, world_size=args.world_size, write_gbps=args.write_gbps)


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        PretrainConfig, _run, prog="launcher/pretrain.py", description=__doc__,
        argv=argv, add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    sys.exit(main())
