"""Fine-tune a task head (classification, token classification/NER, extractive QA) on a
pretrained checkpoint with DeepSpeed ZeRO.

    deepspeed --num_gpus 2 launcher/finetune.py --config configs/finetune/uci_sentiment.yaml init_from=runs/demo/pretrain

Also runs under torchrun and as one plain python process.
"""

from __future__ import annotations

import argparse
import sys

from crucible.cli import stage_main
from training.tasks.config import FinetuneConfig


def _run(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from training.finetune import finetune  # heavy imports only when training
    from training.tasks.features import find_init_model

    if cfg.init_from:  # a folder that is no model is named before data and ranks are set up
        find_init_model(cfg.init_from)
    return finetune(cfg)


def main(argv: list[str] | None = None) -> int:
    return stage_main(FinetuneConfig, _run, prog="launcher/finetune.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
