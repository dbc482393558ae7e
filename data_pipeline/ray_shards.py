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

from data_pipeline.packing import is_validation, token_dtype
from data_pipeline.ray_config import RayConfig
from data_pipeline.tokenizer_config import ShardConfig

ORDERED_WINDOW = 16
"""Default clean shards encoded ahead of the writer; each result holds one clean shard's token ids
in the object store (about half its text size at uint16)."""

_SP: dict[str, object] = {}


def _sentencepiece(tokenizer_dir: str):
    from data_pipeline.tokenizer import load_sentencepiece

    if tokenizer_dir not in _SP:
        _SP.clear()
        _SP[tokenizer_dir] = load_sentencepiece(tokenizer_dir)
    return _SP[tokenizer_dir]


def encode_clean_shard(task: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One clean tar -> (all token ids, tokens per document, validation flags, pieces split off)."""
    from data_pipeline.shards import _batches, _encode_batch, iter_shard_documents

    path, tokenizer_dir, cfg_json = task
    cfg = ShardConfig.model_validate_json(cfg_json)
    sp = _sentencepiece(tokenizer_dir)
    dtype = token_dtype(sp.get_piece_size(), cfg.dtype)
    arrays: list[np.ndarray] = []
    flags: list[bool] = []
    n_split = 0
    texts = (doc["text"] for doc in iter_shard_documents(path))
    for batch in _batches(texts, cfg.batch_documents):
        encoded, split = _encode_batch(sp, batch, cfg, sp.eos_id(), dtype)
        arrays.extend(encoded)
        flags.extend(is_validation(t, cfg.validation_fraction, cfg.split_seed) for t in batch)
        n_split += split
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return ids, lengths, np.array(flags, dtype=bool), n_split


def encode_on_ray(paths: list[Path], tokenizer_dir: str, cfg: ShardConfig,
                  ray_cfg: RayConfig) -> Iterator[tuple[list[np.ndarray], list[bool], int]]:
    """Encoded batches of the clean shards ``paths``, in order, as ``write_token_shards`` takes them."""
    from data_pipeline.ray_executor import RayExecutor

    task_cfg = cfg.model_copy(update={"workers": max(int(ray_cfg.cpus_per_task), 1)}).model_dump_json()
    tokenizer = str(Path(tokenizer_dir).resolve())
    tasks = [(str(Path(p).resolve()), tokenizer, task_cfg) for p in paths]
    executor = RayExecutor(ray_cfg)
    if not ray_cfg.max_in_flight:  # the driver packs and writes one shard at a time: a few ahead suffice
        executor.window = min(executor.window, ORDERED_WINDOW)
    for ids, lengths, flags, n_split in executor.map_ordered(encode_clean_shard, tasks):
        yield np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else [], flags.tolist(), n_split
