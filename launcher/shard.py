"""Tokenize clean documents and write packed webdataset token shards plus manifest.json.

    python launcher/shard.py --config configs/data/sample.yaml input=<clean shards> tokenizer_dir=<dir> output=<dir>
    python launcher/shard.py --verify <manifest.json or shard folder> [...]   # check a written set

``--verify`` checks every shard of the given manifests (or of ``output=``) against the size and
sha256 the manifest records, in parallel, prints one line per bad shard and a summary, and exits
1 when any shard is missing, truncated or changed (0 when all match).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from crucible.cli import stage_main
from crucible.errors import DataError
from crucible.runtime import setup_logging
from data_pipeline.config import DataPrepConfig

EXIT_BAD_SHARDS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verify", nargs="*", metavar="MANIFEST", default=None,
        help="check every shard of these manifest.json files or shard folders (default: output=) "
             "against the manifest's size and sha256; exit 1 if any differs; writes nothing",
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="--verify: shards hashed at once (default: CPU count, at most 32)")


def verify(locations: list[str], threads: int | None) -> int:
    from data_pipeline.shards.verify import verify_manifests

    if threads is not None and threads < 1:
        raise DataError(f"--threads must be at least 1, got {threads}")
    for location in locations:
        if "=" in location and not Path(location).exists():
            raise DataError(f"--verify takes manifest paths, and {location!r} looks like an "
                            "override: put section.key=value overrides before --verify")
    start = time.perf_counter()
    checks = verify_manifests(locations, threads)
    seconds = time.perf_counter() - start
    bad = [c for c in checks if not c.ok]
    for c in bad:
        print(f"BAD {c.url} ({c.split} split of {c.manifest}): {c.problem}", flush=True)
    total = sum(c.actual_bytes or 0 for c in checks)
    summary = (f"checked {len(checks)} shards ({total / 1e6:.1f} MB) of {len(locations)} "
               f"manifest{'s' if len(locations) != 1 else ''} in {seconds:.2f} s")
    if not bad:
        print(f"{summary}: every shard matches its manifest (size and sha256)")
        return 0
    print(f"{summary}: {len(bad)} bad shard{'s' if len(bad) != 1 else ''}; restore them from a good "
          "copy or rebuild the set with launcher/shard.py (a run with data.on_corrupt_shard=skip "
          "replaces their samples and counts them)")
    return EXIT_BAD_SHARDS


def run(cfg: DataPrepConfig, args) -> int:
    setup_logging()
    if args.verify is not None:
        locations = args.verify or ([cfg.output] if cfg.output else [])
        if not locations:
            raise DataError("--verify needs the manifests to check: --verify <manifest.json or "
                            "shard folder> ..., or output=<shard folder>")
        return verify(locations, args.threads)
    from data_pipeline.shards.stage import run_shard

    manifest = run_shard(cfg)
    totals = {s: manifest["totals"][s] for s in ("train", "validation")}
    print(json.dumps(totals), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(DataPrepConfig, run, "launcher/shard.py",
                      __doc__.strip().splitlines()[0], argv=argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
