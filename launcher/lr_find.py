"""Learning-rate range test for a fine-tune recipe: sweeps the learning rate exponentially,
suggests a value and plots loss against learning rate (``<run_dir>/lr_find/lr_find.png``).

    python launcher/lr_find.py --config configs/finetune/uci_sentiment.yaml init_from=runs/demo/pretrain
"""

from __future__ import annotations

import argparse
import sys

from crucible.cli import stage_main
from training.tasks.config import FinetuneConfig


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-lr", type=float, default=1e-6, help="first learning rate")
    parser.add_argument("--end-lr", type=float, default=1.0, help="last learning rate")
    parser.add_argument("--steps", type=int, default=200, help="steps of the sweep")


def _run(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from training.lr_find import lr_find

    return lr_find(cfg, args.start_lr, args.end_lr, args.steps)


def main(argv: list[str] | None = None) -> int:
    return stage_main(FinetuneConfig, _run, prog="launcher/lr_find.py", description=__doc__,
                      argv=argv, add_arguments=_add_arguments)


if __name__ == "__main__":
    sys.exit(main())
