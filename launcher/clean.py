"""Clean raw web/news sources into deduplicated webdataset document shards.

    python launcher/clean.py --config configs/data/sample.yaml input=<path> output=<dir>
"""

from __future__ import annotations

import sys

from crucible.cli import stage_main
from crucible.runtime import setup_logging
from data_pipeline.config import DataPrepConfig


def run(cfg: DataPrepConfig, args) -> int:
    setup_logging()
    from data_pipeline.clean.report import summary_table
    from data_pipeline.clean.stage import run_clean

    stats = run_clean(cfg)
    print(summary_table(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(stage_main(DataPrepConfig, run, "clean.py", __doc__.strip().splitlines()[0]))
