"""Export a model to a Hugging Face Llama directory, or import one into a model directory.

    python launcher/export_hf.py --model <model dir | run dir> --output <hf dir>
    python launcher/export_hf.py --import-hf <hf llama dir> --output <model dir>

A fine-tuned task model (from launcher/finetune.py) exports to the matching Hugging Face class
(LlamaForSequenceClassification, LlamaForTokenClassification, LlamaForQuestionAnswering).
The export loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
and gives the same logits as our model. Weights are streamed shard by shard (--max-shard-size),
so exporting never needs the whole model in memory.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import UserError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5G', '1048576' -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 1048576")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _build_parser(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path,
                     help="model directory or run directory (its latest model) to export")
    src.add_argument("--import-hf", type=Path, metavar="HF_DIR",
                     help="Hugging Face Llama directory (safetensors) to convert into a model directory")
    parser.add_argument("--output", type=Path, required=True, help="directory to write")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weights file of the export")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast the exported weights (default: as stored)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output")


def _run(args: argparse.Namespace) -> int:
    from model.convert import export_hf, import_hf
    from model.io import find_model_dir, is_task_dir

    out: Path = args.output
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"--output {out} is not empty; choose a new directory or pass --force")
    if args.import_hf is not None:
        import_hf(args.import_hf, out)
    else:
        from model.task_io import export_task_hf

        model_dir = find_model_dir(args.model)
        if is_task_dir(model_dir):  # a fine-tuned task model -> LlamaFor{SequenceClassification,...}
            export_task_hf(model_dir, out)
        else:
            export_hf(model_dir, out, max_shard_bytes=parse_size(args.max_shard_size), dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/export_hf.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
