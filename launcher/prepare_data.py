"""Clean -> tokenizer -> token shards in one command; finished steps are skipped.

    python launcher/prepare_data.py --config configs/data/sample.yaml output=runs/sample

Writes <output>/clean, <output>/tokenizer (or tokenizer_dir=...) and <output>/shards/manifest.json.
"""

from __future__ import annotations

import json
import sys

from crucible.cli import stage_main
from crucible.runtime import setup_logging
from data_pipeline.config import DataPrepConfig


def run(cfg: DataPrepConfig, args) -> int:
    setup_logging()
    from data_pipeline.stages import run_prepare_data

    print(json.dumps(run_prepare_data(cfg)), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(DataPrepConfig, run, "launcher/prepare_data.py",
                      __doc__.strip().splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
