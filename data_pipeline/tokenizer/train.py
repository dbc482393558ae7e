"""sentencepiece training on a sample of clean documents, Hugging Face export and the report.

sentencepiece silently skips training lines longer than ``max_sentence_length`` bytes; long lines
are split at spaces first so no text is lost.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from crucible.config import config_to_dict
from crucible.errors import DataError
from crucible.fileio import atomic_write_json, sha256_file
from crucible.provenance import write_provenance
from data_pipeline.tokenizer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenizerConfig
from data_pipeline.tokenizer.folder import MODEL_FILE, REPORT_FILE, SPECIAL_PIECES, VOCAB_FILE
from data_pipeline.tokenizer.hf import build_hf_tokenizer, save_hf_tokenizer
from data_pipeline.tokenizer.sample import sample_documents

log = logging.getLogger("crucible.tokenizer")


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Split ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, at spaces when possible."""
    if len(line.encode("utf-8", "surrogatepass")) <= max_bytes:
        return [line]
    pieces: list[str] = []
    rest = line
    while len(rest.encode("utf-8", "surrogatepass")) > max_bytes:
        # max_bytes // 4 characters always fit (UTF-8 uses at most 4 bytes per character)
        cut = max_bytes // 4
        while cut < len(rest) and len(rest[: cut * 2].encode("utf-8", "surrogatepass")) <= max_bytes:
            cut *= 2
        while len(rest[:cut].encode("utf-8", "surrogatepass")) > max_bytes:
            cut -= max(1, cut // 16)
        space = rest.rfind(" ", 1, cut)
        if space > cut // 2:
            cut = space
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    return pieces


def training_lines(texts: Iterable[str], max_bytes: int, stats: dict) -> Iterator[str]:
    """Lines of the documents, long ones split; counts lines and splits into ``stats``."""
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            parts = split_long_line(line, max_bytes)
            stats["lines"] += len(parts)
            stats["long_lines_split"] += len(parts) > 1
            yield from parts


def _trainer_options(cfg: TokenizerConfig, model_prefix: str) -> dict:
    return {
        "model_prefix": model_prefix,
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "character_coverage": cfg.character_coverage,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        "normalization_rule_name": "identity",
        "add_dummy_prefix": cfg.add_dummy_prefix,
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "user_defined_symbols": list(cfg.user_defined_symbols),
        "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
        "unk_piece": SPECIAL_PIECES["unk"], "bos_piece": SPECIAL_PIECES["bos"],
        "eos_piece": SPECIAL_PIECES["eos"], "pad_piece": SPECIAL_PIECES["pad"],
        "max_sentence_length": cfg.max_sentence_length,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "num_threads": cfg.num_threads,
        "minloglevel": 2,
    }


def train_sentencepiece(texts: list[str], cfg: TokenizerConfig, out_dir: Path) -> dict:
    """Train on ``texts``; writes ``tokenizer.model`` and ``tokenizer.vocab`` into ``out_dir``."""
    stats = {"lines": 0, "long_lines_split": 0}
    with tempfile.TemporaryDirectory(prefix="spm-", dir=out_dir) as tmp:
        prefix = str(Path(tmp) / "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_lines(texts, cfg.max_sentence_length, stats),
                **_trainer_options(cfg, prefix),
            )
        except RuntimeError as exc:
            raise DataError(
                f"sentencepiece training failed: {exc} (a vocabulary larger than the sample "
                "supports? lower tokenizer.vocab_size or give more text)"
            ) from None
        _strip_temp_prefix(Path(tmp) / MODEL_FILE)
        for name in (MODEL_FILE, VOCAB_FILE):
            shutil.move(str(Path(tmp) / name), out_dir / name)
    return stats


def _strip_temp_prefix(model_path: Path) -> None:
    """The model records its (temporary) output path; drop it so equal training gives equal bytes."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.trainer_spec.model_prefix = "tokenizer"
    model_path.write_bytes(proto.SerializeToString(deterministic=True))


def tokenizer_report(sp: spm.SentencePieceProcessor, heldout: list[str], hf: Any = None) -> dict:
    """Bytes per token and tokens per word on held-back documents (and HF id agreement)."""
    ids = sp.encode(heldout) if heldout else []
    tokens = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in heldout)
    words = sum(len(t.split()) for t in heldout)
    report = {
        "heldout_documents": len(heldout),
        "heldout_bytes": n_bytes,
        "heldout_tokens": tokens,
        "bytes_per_token": round(n_bytes / tokens, 4) if tokens else None,
        "tokens_per_word": round(tokens / words, 4) if words else None,
        "unk_tokens": sum(x.count(UNK_ID) for x in ids),
        "byte_fallback_tokens": sum(sum(1 for i in x if sp.is_byte(i)) for x in ids),
    }
    if hf is not None:
        mismatched = sum(
            hf(text, add_special_tokens=False).input_ids != x for text, x in zip(heldout, ids, strict=True)
        )
        report["hf_mismatched_documents"] = mismatched
    return report


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path,
                    root_cfg: Any = None) -> dict:
    """Sample, train, export and report; returns the report. ``out_dir`` is created."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).unlink(missing_ok=True)
    train, heldout, seen = sample_documents(
        texts, cfg.sample_documents, cfg.heldout_documents, cfg.sample_bytes, cfg.seed
    )
    if not train:
        raise DataError(
            f"no training documents (saw {seen}); with tokenizer.heldout_documents="
            f"{cfg.heldout_documents} the corpus needs more documents"
        )
    log.info("training %s tokenizer (vocab %d) on %d documents (%d seen, %d held out)",
             cfg.model_type, cfg.vocab_size, len(train), seen, len(heldout))
    line_stats = train_sentencepiece(train, cfg, out)
    sp = spm.SentencePieceProcessor(model_file=str(out / MODEL_FILE))
    hf = build_hf_tokenizer(out / MODEL_FILE)
    save_hf_tokenizer(hf, out)
    report = {
        "tokenizer_config": config_to_dict(cfg),
        "model_type": cfg.model_type,
        "vocab_size": sp.get_piece_size(),
        "ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
        "sha256": sha256_file(out / MODEL_FILE),
        "documents_seen": seen,
        "training_documents": len(train),
        "training_bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in train),
        "training_lines": line_stats["lines"],
        "long_lines_split": line_stats["long_lines_split"],
        **tokenizer_report(sp, heldout, hf),
    }
    write_provenance(out, root_cfg if root_cfg is not None else cfg)
    atomic_write_json(out / REPORT_FILE, report)
    return report
