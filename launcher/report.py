"""Draw the filter funnel per source of a cleaning run (stats.json) as a PNG and print its summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crucible.cli import tool_main
from crucible.errors import DataError


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="output folder of launcher/clean.py (holds stats.json)")
    parser.add_argument("--out", default=None, help="PNG path (default: <run_dir>/funnel.png)")


def run(args: argparse.Namespace) -> int:
    import json

    from data_pipeline.clean.report import plot_funnel, summary_table

    stats_path = Path(args.run_dir) / "stats.json"
    if not stats_path.is_file():
        raise DataError(f"{stats_path} does not exist: pass the output folder of a finished clean run")
    png = plot_funnel(args.run_dir, args.out)
    print(summary_table(json.loads(stats_path.read_text(encoding="utf-8"))))
    print(f"funnel written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(tool_main(build_parser, run, "report.py", __doc__.strip()))
