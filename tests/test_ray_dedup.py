"""The bucketed dedup shuffle of executor=ray makes exactly the local decisions (no Ray needed)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_pipeline.clean.config import DedupConfig
from data_pipeline.clean.dedup import MinHasher, exact_hash, find_duplicates
from data_pipeline.clean.dedup_ray import find_duplicates_shuffled
from data_pipeline.executors.local import InlineExecutor, LocalExecutor

VOCAB = [f"w{i}" for i in range(3000)]


def corpus(seed: int, inputs: int, docs: int) -> list[list[str]]:
    """Inputs with exact copies, case/space variants and near copies across and within inputs."""
    rng = random.Random(seed)
    pool: list[str] = []
    out = []
    for _ in range(inputs):
        texts = []
        for _ in range(docs):
            roll = rng.random()
            if pool and roll < 0.2:
                texts.append(rng.choice(pool).upper())  # exact after normalisation
            elif pool and roll < 0.45:
                words = rng.choice(pool).split()
                for i in rng.sample(range(len(words)), rng.randint(1, 4)):
                    words[i] = f"x{rng.randrange(10**6)}"
                texts.append(" ".join(words))  # near duplicate
            else:
                texts.append(" ".join(rng.choices(VOCAB, k=rng.randint(20, 120))))
            pool.append(texts[-1])
        out.append(texts)
    out.insert(1, [])  # an input whose documents were all filtered out
    return out


def write_rows(tmp_path, inputs: list[list[str]], cfg: DedupConfig):
    hasher = MinHasher(cfg)
    exact_files, sig_files = [], []
    for i, texts in enumerate(inputs):
        ex, sg = tmp_path / f"{i}.exact.u64", tmp_path / f"{i}.sig.u32"
        np.array([exact_hash(t) for t in texts], dtype=np.uint64).reshape(-1, 2).tofile(ex)
        np.array([hasher.signature(t) for t in texts], dtype=np.uint32).reshape(len(texts), cfg.bands * cfg.rows).tofile(sg)
        exact_files.append(ex)
        sig_files.append(sg)
    return exact_files, sig_files


@pytest.mark.parametrize("buckets,docs_per_map", [(1, 10**6), (3, 70), (16, 1)])
def test_shuffle_matches_local_dedup(tmp_path, buckets, docs_per_map):
    cfg = DedupConfig(bands=6, rows=4)
    exact_files, sig_files = write_rows(tmp_path, corpus(7, inputs=5, docs=60), cfg)
    local = find_duplicates(exact_files, sig_files, cfg)
    assert {"dedup.exact", "dedup.near"} <= set(local.values())  # the corpus exercises both passes
    shuffled = find_duplicates_shuffled(exact_files, sig_files, cfg, InlineExecutor(), tmp_path / "work", buckets,
                                        docs_per_map)
    assert shuffled == local
    assert not (tmp_path / "work" / "shuffle").exists()


@pytest.mark.parametrize("exact,near", [(True, False), (False, True)])
def test_shuffle_matches_local_with_one_pass_off(tmp_path, exact, near):
    cfg = DedupConfig(bands=5, rows=3, exact=exact, near=near)
    exact_files, sig_files = write_rows(tmp_path, corpus(11, inputs=3, docs=40), cfg)
    local = find_duplicates(exact_files, sig_files, cfg)
    assert local
    assert find_duplicates_shuffled(exact_files, sig_files, cfg, InlineExecutor(), tmp_path / "w", 4) == local


def test_shuffle_in_worker_processes_and_empty_run(tmp_path):
    cfg = DedupConfig(bands=4, rows=4)
    exact_files, sig_files = write_rows(tmp_path, corpus(3, inputs=3, docs=30), cfg)
    assert (find_duplicates_shuffled(exact_files, sig_files, cfg, LocalExecutor(2), tmp_path / "w", 5)
            == find_duplicates(exact_files, sig_files, cfg))
    (tmp_path / "e").mkdir()
    empty_ex, empty_sig = write_rows(tmp_path / "e", [[], []], cfg)
    assert find_duplicates_shuffled(empty_ex, empty_sig, cfg, InlineExecutor(), tmp_path / "w", 5) == {}
