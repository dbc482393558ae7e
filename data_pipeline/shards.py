"""Token shards: read clean documents, encode in parallel batches, pack, write tars + manifest.

Determinism: documents are read in shard-name order and encoded in fixed batches by
sentencepiece's own thread pool, which returns ids in input order, so the shards are
byte-identical for any ``shard.workers``. A rerun first removes the manifest (the completion
marker) and the old shards, then writes everything again; every tar is renamed into place only
when complete.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from crucible.config import config_to_dict
from crucible.errors import DataError
from crucible.provenance import provenance, write_provenance
from data_pipeline.manifest import (
    FORMAT,
    KEY_DIGITS,
    MANIFEST_FILE,
    SPLITS,
    TAR_BLOCK,
    sample_key,
    tar_stride,
)
from data_pipeline.packing import Packer, is_validation, split_text, token_dtype
from data_pipeline.tario import atomic_tar_writer, atomic_write_text, sha256_file
from data_pipeline.tokenizer import MODEL_FILE, load_sentencepiece
from data_pipeline.tokenizer_config import ShardConfig

log = logging.getLogger("crucible.shards")

CLEAN_PATTERN = "docs-*.tar"
CLEAN_SUCCESS = "_SUCCESS"
SHARD_EXT = "tokens"


# ---------------------------------------------------------------- reading clean documents

def clean_shard_paths(input_dir: str | Path, require_success: bool = True) -> list[Path]:
    folder = Path(input_dir)
    if not folder.is_dir():
        raise DataError(f"clean shard folder {folder} does not exist (run launcher/clean.py first)")
    if require_success and not (folder / CLEAN_SUCCESS).is_file():
        raise DataError(
            f"{folder} has no {CLEAN_SUCCESS} marker: the cleaning run did not finish; rerun it"
        )
    paths = sorted(folder.glob(CLEAN_PATTERN))
    if not paths:
        raise DataError(f"{folder} holds no {CLEAN_PATTERN} shards")
    return paths


def iter_clean_documents(input_dir: str | Path, require_success: bool = True) -> Iterator[dict]:
    """Documents of a clean shard folder in order: ``{"id", "text", "source", ...}``."""
    for path in clean_shard_paths(input_dir, require_success):
        yield from iter_shard_documents(path)


def iter_shard_documents(path: str | Path) -> Iterator[dict]:
    """Documents of one clean ``docs-NNNNNN.tar`` in order."""
    from webdataset.tariterators import tarfile_to_samples

    try:
        for sample in tarfile_to_samples()([{"url": str(path)}]):
            if "txt" not in sample:
                raise DataError(f"{path}: sample {sample.get('__key__')!r} has no .txt member")
            meta = json.loads(sample["json"]) if "json" in sample else {}
            meta["text"] = sample["txt"].decode("utf-8")
            meta.setdefault("id", sample["__key__"])
            yield meta
    except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"clean shard {path} is unreadable: {exc}") from None


# ---------------------------------------------------------------- writing token shards

class SplitWriter:
    """Writes one split's samples into ``<split>/tokens-NNNNNN.tar`` shards of fixed size."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, dtype: np.dtype) -> None:
        self.out_dir = out_dir
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.pending: list[np.ndarray] = []
        self.pending_samples = 0
        self.next_index = 0
        self.entries: list[dict[str, Any]] = []
        self.layout: tuple[int, int] | None = None

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self.pending.append(samples)
            self.pending_samples += len(samples)
        while self.pending_samples >= self.samples_per_shard:
            self._flush(self.samples_per_shard)

    def close(self) -> None:
        if self.pending_samples:
            self._flush(self.pending_samples)

    def _flush(self, n: int) -> None:
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        shard, rest = block[:n], block[n:]
        self.pending = [rest] if len(rest) else []
        self.pending_samples = len(rest)
        rel = f"{self.split}/tokens-{len(self.entries):06d}.tar"
        path = self.out_dir / rel
        data = shard.astype(self.dtype, copy=False)
        with atomic_tar_writer(path) as writer:
            for i, row in enumerate(data):
                writer.write({"__key__": sample_key(self.next_index + i), SHARD_EXT: row.tobytes()})
        layout = measure_layout(path, len(data), data.shape[1] * self.dtype.itemsize, self.next_index)
        if self.layout is not None and layout != self.layout:
            raise RuntimeError(f"{path}: tar layout {layout} differs from earlier shards {self.layout}")
        self.layout = layout
        self.entries.append({
            "path": rel, "samples": len(data), "tokens": int(data.size),
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "first_key": sample_key(self.next_index),
        })
        self.next_index += len(data)


def measure_layout(path: Path, samples: int, sample_bytes: int, first_index: int) -> tuple[int, int]:
    """``(header_bytes, stride)`` such that member ``i`` starts at ``header_bytes + i * stride``.

    Raises if the tar does not have that fixed layout (the loader's random access relies on it).
    """
    offsets = []
    with tarfile.open(path, "r:") as tf:
        for i, member in enumerate(tf):
            if member.name != f"{sample_key(first_index + i)}.{SHARD_EXT}" or member.size != sample_bytes:
                raise RuntimeError(f"{path}: unexpected member {i}: {member.name} ({member.size} bytes)")
            offsets.append(member.offset_data)
    if len(offsets) != samples:
        raise RuntimeError(f"{path}: wrote {len(offsets)} members, expected {samples}")
    header = offsets[0]
    stride = offsets[1] - offsets[0] if len(offsets) > 1 else tar_stride(sample_bytes, header)
    if any(off != header + i * stride for i, off in enumerate(offsets)):
        raise RuntimeError(f"{path}: members are not evenly spaced")
    return header, stride


class _WriteBehind:
    """Shard writing (tar, fsync, checksum) on one background thread while the next batch encodes.

    One worker runs the writes in submission order, so the output is unchanged; sentencepiece
    releases the GIL while encoding. At most ``depth`` batches wait, bounding memory.
    """

    def __init__(self, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: deque[Future] = deque()
        self.depth = depth

    def submit(self, fn: Any, *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def finish(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


EncodedBatch = tuple[list[np.ndarray], list[bool], int]
"""Token arrays of consecutive documents (EOS appended), their validation flags, pieces split off."""


def _encode_batch(sp, texts: list[str], cfg: ShardConfig, eos: int, dtype) -> tuple[list[np.ndarray], int]:
    """Encode documents (long ones split first) and append EOS; returns arrays and split count."""
    pieces: list[str] = []
    owner: list[int] = []
    for d, text in enumerate(texts):
        parts = split_text(text, cfg.max_chunk_chars)
        pieces.extend(parts)
        owner.extend([d] * len(parts))
    ids = sp.encode(pieces, num_threads=cfg.workers)
    per_doc: list[list[int]] = [[] for _ in texts]
    for d, piece_ids in zip(owner, ids, strict=True):
        per_doc[d].extend(piece_ids)
    arrays = []
    for doc_ids in per_doc:
        doc_ids.append(eos)
        arrays.append(np.asarray(doc_ids, dtype=dtype))
    return arrays, len(pieces) - len(texts)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _clear_output(out: Path) -> None:
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for old in (out / split).glob("tokens-*.tar*"):
            old.unlink()


def _encode_local(texts: Iterable[str], sp, cfg: ShardConfig, eos: int, dtype) -> Iterator[EncodedBatch]:
    for batch in _batches(texts, cfg.batch_documents):
        arrays, n_split = _encode_batch(sp, batch, cfg, eos, dtype)
        flags = [is_validation(text, cfg.validation_fraction, cfg.split_seed) for text in batch]
        yield arrays, flags, n_split


def write_token_shards(
    texts: Iterable[str], tokenizer_dir: str | Path, out_dir: str | Path, cfg: ShardConfig,
    root_cfg: Any = None, encoded: Iterable[EncodedBatch] | None = None,
) -> dict[str, Any]:
    """Encode, pack and write ``texts`` (in order); returns the manifest (also written last).

    ``encoded``: documents already encoded elsewhere (executor=ray), in order, instead of ``texts``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out)
    sp = load_sentencepiece(tokenizer_dir)
    vocab_size, eos = sp.get_piece_size(), sp.eos_id()
    dtype = token_dtype(vocab_size, cfg.dtype)
    packers = {s: Packer(cfg.seq_len, dtype) for s in SPLITS}
    writers = {s: SplitWriter(out, s, cfg.samples_per_shard, dtype) for s in SPLITS}
    split_documents = 0
    behind = _WriteBehind()
    try:
        batches = encoded if encoded is not None else _encode_local(texts, sp, cfg, eos, dtype)
        for arrays, flags, n_split in batches:
            split_documents += n_split
            routed: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
            for val, arr in zip(flags, arrays, strict=True):
                routed["validation" if val else "train"].append(arr)
            for s in SPLITS:
                behind.submit(writers[s].add, packers[s].add(routed[s]))
        for w in writers.values():
            behind.submit(w.close)
        behind.finish()
    except BaseException:
        behind.abort()
        raise
    manifest = _manifest(out, tokenizer_dir, sp, dtype, cfg, packers, writers, split_documents, root_cfg)
    write_provenance(out, root_cfg if root_cfg is not None else cfg)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _manifest(out, tokenizer_dir, sp, dtype, cfg, packers, writers, split_documents, root_cfg) -> dict:
    sample_bytes = (cfg.seq_len + 1) * dtype.itemsize
    layouts = {w.layout for w in writers.values() if w.layout is not None}
    if len(layouts) > 1:
        raise RuntimeError(f"splits have different tar layouts: {layouts}")
    header, stride = layouts.pop() if layouts else (TAR_BLOCK, tar_stride(sample_bytes))
    totals: dict[str, Any] = {"split_long_documents_pieces": split_documents}
    for s in SPLITS:
        entries = writers[s].entries
        totals[s] = {
            "documents": packers[s].documents,
            "tokens_in": packers[s].tokens_in,
            "samples": sum(e["samples"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "dropped_tail_tokens": packers[s].tail_tokens,
            "shards": len(entries),
        }
    totals["documents"] = sum(totals[s]["documents"] for s in SPLITS)
    model_path = Path(tokenizer_dir) / MODEL_FILE
    return {
        "format": FORMAT,
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "sample_layout": {
            "container": "tar", "key_digits": KEY_DIGITS, "extension": SHARD_EXT,
            "header_bytes": header, "stride": stride,
            "sample_bytes": sample_bytes, "byte_order": "little",
        },
        "tokenizer": {
            "path": str(Path(tokenizer_dir).resolve()), "sha256": sha256_file(model_path),
            "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "pad_id": sp.pad_id(), "unk_id": sp.unk_id(),
        },
        "splits": {s: writers[s].entries for s in SPLITS},
        "shard_config": config_to_dict(cfg),
        "totals": totals,
        "provenance": provenance(root_cfg if root_cfg is not None else cfg),
    }


def is_complete(out_dir: str | Path) -> bool:
    """The manifest is written last: its presence marks a finished shard folder."""
    return (Path(out_dir) / MANIFEST_FILE).is_file()


def is_up_to_date(out_dir: str | Path, tokenizer_dir: str | Path, cfg: ShardConfig) -> bool:
    """Complete, and made with this tokenizer (by checksum) and these shard settings."""
    if not is_complete(out_dir):
        return False
    manifest = json.loads((Path(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    model = Path(tokenizer_dir) / MODEL_FILE
    return (model.is_file() and manifest.get("tokenizer", {}).get("sha256") == sha256_file(model)
            and manifest.get("shard_config") == config_to_dict(cfg))


def run_shard(cfg) -> dict[str, Any]:
    """Stage entry: encode the clean shards in ``cfg.input`` with ``cfg.tokenizer_dir``."""
    if not cfg.input or not cfg.output or not cfg.tokenizer_dir:
        raise DataError("shard needs input=<clean shard folder> tokenizer_dir=<folder> output=<folder>")
    paths = clean_shard_paths(cfg.input)  # fail early, before any output is touched
    if getattr(cfg, "executor", "local") == "ray":
        from data_pipeline.ray_shards import encode_on_ray

        encoded = encode_on_ray(paths, cfg.tokenizer_dir, cfg.shard, cfg.ray)
        return write_token_shards((), cfg.tokenizer_dir, cfg.output, cfg.shard, root_cfg=cfg, encoded=encoded)
    texts = (doc["text"] for doc in iter_clean_documents(cfg.input))
    return write_token_shards(texts, cfg.tokenizer_dir, cfg.output, cfg.shard, root_cfg=cfg)


def run_prepare_data(cfg) -> dict[str, Any]:
    """clean -> tokenizer -> shards under ``cfg.output`` (``clean/``, ``tokenizer/``, ``shards/``).

    Each step is skipped when its output is complete and was made with the same settings
    (cleaning decides that itself, from its own marker and work folder).
    """
    from data_pipeline import tokenizer as tok

    if not cfg.output:
        raise DataError("prepare_data needs output=<root folder> (clean/, tokenizer/, shards/ go inside)")
    root = Path(cfg.output)
    clean_dir, shard_dir = root / "clean", root / "shards"
    tok_dir = Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else root / "tokenizer"
    steps: dict[str, str] = {}

    if (clean_dir / CLEAN_SUCCESS).is_file():  # clean.is_complete, without importing the stack
        steps["clean"] = "skipped (complete)"
    else:
        from data_pipeline import clean

        clean.run_clean(cfg.model_copy(update={"output": str(clean_dir)}))
        steps["clean"] = "done"
    stage_cfg = cfg.model_copy(update={"input": str(clean_dir), "tokenizer_dir": str(tok_dir)})
    if tok.is_up_to_date(tok_dir, cfg.tokenizer):
        steps["tokenizer"] = "skipped (complete)"
    else:
        tok.run_build_tokenizer(stage_cfg.model_copy(update={"output": str(tok_dir)}))
        steps["tokenizer"] = "done"
    if is_up_to_date(shard_dir, tok_dir, cfg.shard):
        steps["shards"] = "skipped (complete)"
    else:
        run_shard(stage_cfg.model_copy(update={"output": str(shard_dir)}))
        steps["shards"] = "done"
    for step, what in steps.items():
        log.info("%s: %s", step, what)
    return {"steps": steps, "clean": str(clean_dir), "tokenizer": str(tok_dir),
            "manifest": str(shard_dir / MANIFEST_FILE)}
