"""Predict with a fine-tuned task model.

    python launcher/predict.py --model runs/finetune/uci_sentiment --input reviews.txt [--output preds.jsonl]

--model: a fine-tune run directory (its newest model) or a task model directory.
--input, by suffix: .txt: one text per line (NER: one whitespace-tokenised sentence per line;
not for QA); .csv/.tsv (classification): a header row naming the text column (e.g. only
"text"), or the recipe's header-less task.columns with or without the label column; .jsonl:
one JSON object per line ({"text": ...}; NER {"tokens": [...]}; QA {"question", "context"});
otherwise the recipe's format (CoNLL, SQuAD JSON). Labels in the input are ignored.
Writes one JSON line per input line (.txt) or row/record, in input order (stdout without
--output). A blank line, or a row whose text is empty, keeps its place with
{"text": "", "prediction": null, "empty": true} (NER: "tokens": []): no label is guessed for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crucible.cli import tool_main


def _build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="fine-tune run directory or task model directory")
    parser.add_argument("--input", type=Path, required=True,
                        help="examples: .txt (one per line), .csv/.tsv/.jsonl, or the recipe's format; one "
                             "output line per input line or row, a blank one as "
                             '{"prediction": null, "empty": true}')
    parser.add_argument("--output", type=Path, default=None, help="JSON lines file (default: stdout)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="examples per forward pass")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _run(args: argparse.Namespace) -> int:
    import datasets

    from training.tasks.predict import predict, write_predictions

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    write_predictions(predict(args.model, args.input, args.batch_size), args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/predict.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
