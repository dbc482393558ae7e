"""Contamination check: n-gram overlap between fine-tune evaluation sets and pretraining shards.

Evaluation texts are tokenised with the pretraining tokenizer; every n-gram of token ids (n =
``task.contamination_ngram``, 13 by default as in the GPT-3 and Llama reports) is hashed, and
the pretraining token shards are streamed once, hashing their n-grams with a vectorised rolling
hash and looking them up. An evaluation example counts as contaminated when any of its n-grams
occurs in the pretraining data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_P = np.uint64(1_000_003)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """uint64 polynomial hashes of every length-``n`` window of ``tokens`` (wrapping arithmetic)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    if len(tokens) < n:
        return np.empty(0, dtype=np.uint64)
    count = len(tokens) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _P + tokens[k: k + count] + np.uint64(1)
    return h


def _train_shard_samples(manifest_path: Path) -> Iterable[np.ndarray]:
    import webdataset as wds

    manifest = json.loads(manifest_path.read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    urls = [str((manifest_path.parent / s["path"]).resolve()) for s in manifest["splits"]["train"]]
    # no decoders: samples stay raw bytes, nothing is unpickled; every shard is read here
    # (the check runs on one rank), so no node splitting
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=lambda src: src,
                             workersplitter=lambda src: src)
    for sample in dataset:
        yield np.frombuffer(sample["tokens"], dtype=dtype)


def contamination_report(eval_sets: dict[str, list[list[int]]], manifests: list[str | Path],
                         n: int = 13) -> dict[str, dict[str, float | int]]:
    """Per evaluation split: examples, examples sharing an n-gram with pretraining data, fraction."""
    per_example: dict[str, list[np.ndarray]] = {
        split: [ngram_hashes(np.asarray(ids), n) for ids in rows] for split, rows in eval_sets.items()
    }
    wanted = np.unique(np.concatenate(
        [h for rows in per_example.values() for h in rows] or [np.empty(0, dtype=np.uint64)]))
    found = np.zeros(len(wanted), dtype=bool)
    scanned = 0
    if len(wanted):
        for manifest in manifests:
            for tokens in _train_shard_samples(Path(manifest)):
                h = ngram_hashes(tokens, n)
                scanned += len(h)
                idx = np.searchsorted(wanted, h)
                idx[idx == len(wanted)] = 0
                found[idx[wanted[idx] == h]] = True
    hit_set = wanted[found]
    report: dict[str, dict[str, float | int]] = {}
    for split, rows in per_example.items():
        hits = sum(bool(len(h)) and bool(np.isin(h, hit_set).any()) for h in rows)
        report[split] = {
            "examples": len(rows), "contaminated": int(hits),
            "fraction": hits / max(len(rows), 1), "ngram": n, "pretrain_ngrams_scanned": scanned,
        }
    return report
