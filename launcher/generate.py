"""Generate text with a trained model.

    python launcher/generate.py --model <model dir | HF dir | run dir> --prompt "The fire" [--prompt ...]
    python launcher/generate.py --model runs/cpu_tiny --prompts-file prompts.txt --temperature 0.8 --top-p 0.9

Greedy by default (--temperature 0); prompts of different lengths are batched together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import UserError


def _build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory, Hugging Face Llama directory, or run directory (its latest model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="UTF-8 text file, one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--no-stop-at-eos", action="store_true", help="always generate --max-new-tokens")
    parser.add_argument("--start", choices=("eos", "bos", "none"), default="eos",
                        help="token put before each prompt (pretraining data starts documents after EOS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: {exc}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def _run(args: argparse.Namespace) -> int:
    from model.generate import SamplingConfig, generate_text

    prompts = _read_prompts(args)
    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, eos_id=None if args.no_stop_at_eos else 2,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    rows = generate_text(args.model, prompts, sampling, start=args.start, device=args.device,
                         dtype=args.dtype, batch_size=args.batch_size)
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            print(f"{row['prompt']}{row['completion']}\n", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(_build_parser, _run, prog="launcher/generate.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
