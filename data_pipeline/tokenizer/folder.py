"""A tokenizer folder: its files, its completion marker, and loading its sentencepiece model.

Files: ``tokenizer.model``, ``tokenizer.vocab`` (piece and score per line), Hugging Face files
(``tokenizer.json``, ``tokenizer_config.json``, ...), ``report.json`` (written last),
``config.yaml``, ``provenance.json``. Ids follow the Llama layout plus pad: unk 0, bos 1, eos 2,
pad 3 (:mod:`data_pipeline.tokenizer.config`).
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from crucible.config import config_to_dict
from crucible.errors import DataError
from data_pipeline.tokenizer.config import TokenizerConfig

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
REPORT_FILE = "report.json"
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def is_complete(tokenizer_dir: str | Path) -> bool:
    """The report is written last: its presence marks a finished tokenizer folder."""
    d = Path(tokenizer_dir)
    return (d / REPORT_FILE).is_file() and (d / MODEL_FILE).is_file()


def is_up_to_date(tokenizer_dir: str | Path, cfg: TokenizerConfig) -> bool:
    """Complete and trained with these settings (``num_threads`` aside)."""
    if not is_complete(tokenizer_dir):
        return False
    report = json.loads((Path(tokenizer_dir) / REPORT_FILE).read_text(encoding="utf-8"))
    ignore = {"num_threads"}
    saved = {k: v for k, v in report.get("tokenizer_config", {}).items() if k not in ignore}
    return saved == {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}


def load_sentencepiece(tokenizer_dir: str | Path) -> spm.SentencePieceProcessor:
    path = Path(tokenizer_dir) / MODEL_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: pass tokenizer_dir=<folder written by launcher/build_tokenizer.py>"
        )
    return spm.SentencePieceProcessor(model_file=str(path))
