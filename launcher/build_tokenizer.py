"""Train the sentencepiece tokenizer on clean document shards.

    python launcher/build_tokenizer.py --config configs/data/sample.yaml input=<clean shards> output=<dir>

Writes tokenizer.model, tokenizer.vocab, Hugging Face tokenizer files, report.json (bytes per
token, tokens per word on held-back documents), config.yaml and provenance.json.
"""

from __future__ import annotations

import json
import sys

from crucible.cli import stage_main
from crucible.runtime import setup_logging
from data_pipeline.config import DataPrepConfig


def run(cfg: DataPrepConfig, args) -> int:
    setup_logging()
    from data_pipeline.tokenizer.stage import run_build_tokenizer

    report = run_build_tokenizer(cfg)
    keys = ("vocab_size", "training_documents", "bytes_per_token", "tokens_per_word",
            "hf_mismatched_documents")
    print(json.dumps({k: report.get(k) for k in keys}), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(DataPrepConfig, run, "launcher/build_tokenizer.py",
                      __doc__.strip().splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
