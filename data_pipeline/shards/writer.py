"""Writing a token-shard set: encode, pack, write tars per split, and the manifest last.

Determinism: documents are read in shard-name order and encoded in fixed batches, so the shards
are byte-identical for any ``shard.workers`` (and for executor=ray). A rerun first removes the
manifest (the completion marker) and the old shards, then writes everything again; every tar
is renamed into place only when complete.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from crucible.config import config_to_dict
from crucible.fileio import atomic_write_json, sha256_file
from crucible.provenance import provenance, write_provenance
from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.encode import EncodedBatch, encode_texts
from data_pipeline.shards.manifest import MANIFEST_FILE, SPLITS, build_manifest
from data_pipeline.shards.packing import Packer, token_dtype
from data_pipeline.shards.tario import TAR_BLOCK, sample_key, tar_stride, write_token_tar
from data_pipeline.tokenizer.folder import MODEL_FILE, load_sentencepiece


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
        layout = write_token_tar(path, data, self.next_index)
        if self.layout is not None and layout != self.layout:
            raise RuntimeError(f"{path}: tar layout {layout} differs from earlier shards {self.layout}")
        self.layout = layout
        self.entries.append({
            "path": rel, "samples": len(data), "tokens": int(data.size),
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "first_key": sample_key(self.next_index),
        })
        self.next_index += len(data)


class WriteBehind:
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


def _clear_output(out: Path) -> None:
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for old in (out / split).glob("tokens-*.tar*"):
            old.unlink()


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
    batches = encoded if encoded is not None else encode_texts(texts, sp, cfg, eos, dtype)
    split_documents = _pack_and_write(batches, packers, writers)
    run_cfg = root_cfg if root_cfg is not None else cfg
    manifest = build_manifest(
        cfg.seq_len, dtype, _layout(writers, (cfg.seq_len + 1) * dtype.itemsize),
        _tokenizer_record(tokenizer_dir, sp), {s: writers[s].entries for s in SPLITS},
        _totals(packers, writers, split_documents), config_to_dict(cfg), provenance(run_cfg))
    write_provenance(out, run_cfg)
    atomic_write_json(out / MANIFEST_FILE, manifest, indent=1)
    return manifest


def _pack_and_write(batches: Iterable[EncodedBatch], packers: dict[str, Packer],
                    writers: dict[str, SplitWriter]) -> int:
    """Route each document to its split, pack, and write shards behind the encoding; returns the
    number of pieces long documents were split into."""
    split_documents = 0
    behind = WriteBehind()
    try:
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
    return split_documents


def _layout(writers: dict[str, SplitWriter], sample_bytes: int) -> tuple[int, int]:
    """The one ``(header_bytes, stride)`` of every tar written (the default when none was)."""
    layouts = {w.layout for w in writers.values() if w.layout is not None}
    if len(layouts) > 1:
        raise RuntimeError(f"splits have different tar layouts: {layouts}")
    return layouts.pop() if layouts else (TAR_BLOCK, tar_stride(sample_bytes))


def _tokenizer_record(tokenizer_dir: str | Path, sp: spm.SentencePieceProcessor) -> dict[str, Any]:
    return {
        "path": str(Path(tokenizer_dir).resolve()), "sha256": sha256_file(Path(tokenizer_dir) / MODEL_FILE),
        "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(), "unk_id": sp.unk_id(),
    }


def _totals(packers: dict[str, Packer], writers: dict[str, SplitWriter], split_documents: int) -> dict[str, Any]:
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
    return totals
