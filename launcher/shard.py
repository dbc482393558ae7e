"""Tokenize clean documents and write packed webdataset token shards plus manifest.json.

    python launcher/shard.py --config configs/data/sample.yaml input=<clean shards> tokenizer_dir=<dir> output=<dir>
"""

from __future__ import annotations

import json
import sys

from crucible.cli import stage_main
from crucible.runtime import setup_logging
from data_pipeline.config import DataPrepConfig


def run(cfg: DataPrepConfig, args) -> int:
    setup_logging()
    from data_pipeline.shards.stage import run_shard

    manifest = run_shard(cfg)
    totals = {s: manifest["totals"][s] for s in ("train", "validation")}
    print(json.dumps(totals), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(DataPrepConfig, run, "launcher/shard.py",
                      __doc__.strip().splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
