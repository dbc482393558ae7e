"""Token shards with executor=ray: each clean ``docs-NNNNNN.tar`` is encoded by one Ray task.

Tasks return the documents' token ids (EOS appended) and validation flags; the driver takes the
results in clean-shard order (:meth:`RayExecutor.map_ordered`, a bounded window ahead) and packs
and writes exactly as the local run does. Encoding one document does not depend on which
documents share its batch, so the shards are byte-identical to executor=local.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipeline.clean.output import iter_shard_documents
from data_pipeline.executors.config import RayConfig
from data_pipeline.executors.ray import RayExecutor
from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.encode import EncodedBatch, encode_texts
from data_pipeline.shards.packing import token_dtype
from data_pipeline.tokenizer.folder import load_sentencepiece

ORDERED_WINDOW = 16
"""Default clean shards encoded ahead of the writer; each result holds one clean shard's token ids
in the object store (about half its text size at uint16)."""

_SP: dict[str, spm.SentencePieceProcessor] = {}


def _sentencepiece(tokenizer_dir: str) -> spm.SentencePieceProcessor:
    if tokenizer_dir not in _SP:
        _SP.clear()
        _SP[tokenizer_dir] = load_sentencepiece(tokenizer_dir)
    return _SP[tokenizer_dir]


def encode_clean_shard(task: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One clean tar -> (all token ids, tokens per document, validation flags, pieces split off)."""
    path, tokenizer_dir, cfg_json = task
    cfg = ShardConfig.model_validate_json(cfg_json)
    sp = _sentencepiece(tokenizer_dir)
    dtype = token_dtype(sp.get_piece_size(), cfg.dtype)
    arrays: list[np.ndarray] = []
    flags: list[bool] = []
    n_split = 0
    texts = (doc["text"] for doc in iter_shard_documents(path))
    for encoded, batch_flags, split in encode_texts(texts, sp, cfg, sp.eos_id(), dtype):
        arrays.extend(encoded)
        flags.extend(batch_flags)
        n_split += split
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return ids, lengths, np.array(flags, dtype=bool), n_split


def encode_on_ray(paths: list[Path], tokenizer_dir: str, cfg: ShardConfig,
                  ray_cfg: RayConfig) -> Iterator[EncodedBatch]:
    """Encoded batches of the clean shards ``paths``, in order, as ``write_token_shards`` takes them."""
    task_cfg = cfg.model_copy(update={"workers": max(int(ray_cfg.cpus_per_task), 1)}).model_dump_json()
    tokenizer = str(Path(tokenizer_dir).resolve())
    tasks = [(str(Path(p).resolve()), tokenizer, task_cfg) for p in paths]
    executor = RayExecutor(ray_cfg)
    if not ray_cfg.max_in_flight:  # the driver packs and writes one shard at a time: a few ahead suffice
        executor.window = min(executor.window, ORDERED_WINDOW)
    for ids, lengths, flags, n_split in executor.map_ordered(encode_clean_shard, tasks):
        yield np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else [], flags.tolist(), n_split
