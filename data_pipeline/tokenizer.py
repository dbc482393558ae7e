"""sentencepiece tokenizer training, Hugging Face export and the tokenizer report.

The training sample is drawn in one streaming pass with bounded memory: every document gets a
seeded 64-bit hash of its text and the documents with the smallest hashes are kept in a heap
(bottom-k sampling), so the sample is independent of document order and of how the corpus is
split into files. The smallest ``heldout_documents`` hashes are held back for the report.

sentencepiece silently skips training lines longer than ``max_sentence_length`` bytes; long lines
are split at spaces first so no text is lost.

Output folder: ``tokenizer.model``, ``tokenizer.vocab`` (piece and score per line), Hugging Face
files (``tokenizer.json``, ``tokenizer_config.json``, ...), ``report.json``, ``config.yaml``,
``provenance.json``. Ids follow the Llama layout plus pad: unk 0, bos 1, eos 2, pad 3.

BOS/EOS: neither sentencepiece (``encode``) nor the Hugging Face tokenizer adds BOS or EOS by
default (``add_special_tokens`` has no effect); the token shards append EOS after every document
and use no BOS. Special-token strings inside text (``"</s>"``) are encoded as text by both
(``split_special_tokens=True``); put special ids in by id (``tokenizer.eos_token_id``).
Exception, unigram models only: text that literally contains a control or byte piece
(``"</s>"``, ``"<0x41>"``) is encoded differently by the Hugging Face Viterbi.
"""

from __future__ import annotations

import heapq
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import xxhash

from crucible.config import config_to_dict
from crucible.errors import DataError
from crucible.provenance import write_provenance
from data_pipeline.tario import atomic_write_text, sha256_file
from data_pipeline.tokenizer_config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenizerConfig

log = logging.getLogger("crucible.tokenizer")

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
REPORT_FILE = "report.json"
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def text_hash(text: str, seed: int) -> int:
    """Seeded 64-bit hash of a text (stable across runs and machines, unlike ``hash()``)."""
    return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed=seed)


def sample_documents(
    texts: Iterable[str], n_train: int, n_heldout: int, max_bytes: int, seed: int
) -> tuple[list[str], list[str], int]:
    """Bottom-k sample by text hash in one pass: ``(train, heldout, documents_seen)``.

    At most a tenth of the sampled documents is held out.

    Memory holds at most ``n_train + n_heldout`` documents and about ``max_bytes`` of text
    (documents with the largest hashes are evicted first when the byte budget is exceeded).
    """
    k = n_train + n_heldout
    heap: list[tuple[int, str]] = []  # max-heap by hash via negated keys
    held_bytes = 0
    seen = 0
    for text in texts:
        seen += 1
        h = text_hash(text, seed)
        if len(heap) >= k and -heap[0][0] <= h:
            continue
        heapq.heappush(heap, (-h, text))
        held_bytes += len(text.encode("utf-8", "surrogatepass"))
        while len(heap) > k or (held_bytes > max_bytes and len(heap) > n_heldout + 1):
            _, dropped = heapq.heappop(heap)
            held_bytes -= len(dropped.encode("utf-8", "surrogatepass"))
    ordered = [text for _, text in sorted(heap, key=lambda item: (-item[0], item[1]))]
    n_heldout = min(n_heldout, len(ordered) // 10)  # a small corpus keeps 90% for training
    return ordered[n_heldout:], ordered[:n_heldout], seen


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
    return dict(
        model_prefix=model_prefix,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        split_digits=cfg.split_digits,
        normalization_rule_name="identity",
        add_dummy_prefix=cfg.add_dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(cfg.user_defined_symbols),
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        unk_piece=SPECIAL_PIECES["unk"], bos_piece=SPECIAL_PIECES["bos"],
        eos_piece=SPECIAL_PIECES["eos"], pad_piece=SPECIAL_PIECES["pad"],
        max_sentence_length=cfg.max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=cfg.num_threads,
        minloglevel=2,
    )


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
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.trainer_spec.model_prefix = "tokenizer"
    model_path.write_bytes(proto.SerializeToString(deterministic=True))


def build_hf_tokenizer(model_path: Path):
    """A ``PreTrainedTokenizerFast`` that encodes exactly like the sentencepiece model."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab: dict | list = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        # unigram: the Hugging Face Viterbi can match control/byte pieces ("</s>", "<0x41>") that
        # appear literally in text, sentencepiece never does (documented limitation; scores are
        # kept, since the unknown-character penalty is derived from the lowest score).
        vocab = [(p.piece, p.score) for p in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if backend is None:
        raise DataError(f"{model_path}: unsupported sentencepiece model type")
    control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # unknown, control
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_PIECES["unk"], bos_token=SPECIAL_PIECES["bos"],
        eos_token=SPECIAL_PIECES["eos"], pad_token=SPECIAL_PIECES["pad"],
        model_max_length=10**9, clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # "</s>" inside text is text, as in sentencepiece
    )


def save_hf_tokenizer(hf, out_dir: Path) -> None:
    """``save_pretrained``, naming the class both transformers 4 and 5 resolve."""
    hf.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def tokenizer_report(sp: spm.SentencePieceProcessor, heldout: list[str], hf=None) -> dict:
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
                    root_cfg=None) -> dict:
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
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


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


def run_build_tokenizer(cfg) -> dict:
    """Stage entry: train on the clean shards in ``cfg.input``, write ``cfg.output``."""
    from data_pipeline.shards import clean_shard_paths, iter_clean_documents

    if not cfg.input or not cfg.output:
        raise DataError("build_tokenizer needs input=<clean shard folder> and output=<folder>")
    clean_shard_paths(cfg.input)  # fail early, before any output is touched
    texts = (doc["text"] for doc in iter_clean_documents(cfg.input))
    return train_tokenizer(texts, cfg.tokenizer, cfg.output, root_cfg=cfg)
