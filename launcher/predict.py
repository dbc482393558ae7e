"""Predict with a fine-tuned task model.

    python launcher/predict.py --model runs/finetune/uci_sentiment --input reviews.txt [--output preds.jsonl]

--model: a fine-tune run directory (its newest model) or a task model directory.
--input: the task's own format (TSV/CSV/JSON lines, CoNLL, SQuAD JSON) or plain text
(.txt: one text per line; for NER one whitespace-tokenised sentence per line).
Writes one JSON line per example (stdout without --output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crucible.cli import tool_main


def _build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="fine-tune run directory or task model directory")
    parser.add_argument("--input", type=Path, required=True, help="examples to predict")
    parser.add_argument("--output", type=Path, default=None, help="JSON lines file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")


def _run(args: argparse.Namespace) -> int:
    from training.tasks.predict import predict, write_predictions

    write_predictions(predict(args.model, args.input, args.batch_size), args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/predict.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
