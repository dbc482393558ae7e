"""Write the run report (Markdown + PNGs, the same as the demo's) for any stage outputs.

    python launcher/report.py runs/x/clean runs/x/shards runs/x/pretrain runs/x/finetune --out runs/x/report.md
    python launcher/report.py runs/sample/clean          # report.md + funnel.png in the clean folder

Each directory's kind is recognised from its files: a cleaning output (stats.json), tokenizer,
token shards (manifest.json; its tokenizer is reported with it), a pretraining or a fine-tune
run directory. A folder holding such outputs (prepare_data's output, the demo's run directory)
stands for all of them. A directory that does not exist or is of no known kind is noted in the
report and skipped. The data funnel of a cleaning output is also printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import DataError


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="stage output or run directories, in any order (clean, tokenizer, shards, "
                             "pretrain, finetune; or a folder holding them)")
    parser.add_argument("--out", default=None,
                        help="report path (default: DIR/report.md for one directory, else report.md in "
                             "the directories' common parent); PNGs are written beside it")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write the report text to <out dir>/tensorboard_report (as the demo does)")


def default_out(dirs: list[str]) -> Path:
    if len(dirs) == 1:
        return Path(dirs[0]) / "report.md"
    return Path(os.path.commonpath([os.path.abspath(d) for d in dirs])) / "report.md"


def run(args: argparse.Namespace) -> int:
    import json

    from data_pipeline.clean.report import summary_table
    from training.report import expand, write_report

    found = expand(args.dirs)
    if not found.stages and not found.samples:
        raise DataError(f"no stage output in {', '.join(args.dirs)}: pass the output folders of clean, "
                        "build_tokenizer, shard, prepare_data, pretrain or finetune")
    out = Path(args.out) if args.out else default_out(args.dirs)
    if out.suffix.lower() != ".md":
        raise DataError(f"--out {out} is not a Markdown path: --out names the report (e.g. "
                        f"{out.with_suffix('.md')}); its PNGs, the data funnel among them "
                        "(funnel.png), are written beside it")
    report = write_report(args.dirs, out, tensorboard=args.tensorboard)
    for kind, path in found.stages:
        print(f"{kind:9s} {path}")
        if kind == "clean":
            print(summary_table(json.loads((path / "stats.json").read_text(encoding="utf-8"))))
    for note in found.notes:
        print(note.replace("`", ""))
    print(f"report written to {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(build_parser, run, prog="launcher/report.py", description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
