"""Exact and MinHash-LSH near-duplicate detection: above/below the threshold, clusters, seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_pipeline.clean.config import DedupConfig
from data_pipeline.clean.dedup import MinHasher, exact_hash, find_duplicates

VOCAB = [f"w{i}" for i in range(5000)]


def doc(seed: int, n: int = 300) -> list[str]:
    return random.Random(seed).choices(VOCAB, k=n)


def mutate(words: list[str], n_changes: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = list(words)
    for i in rng.sample(range(len(out)), n_changes):
        out[i] = f"changed{rng.randrange(10**9)}"
    return out


def jaccard(a: list[str], b: list[str], k: int = 5) -> float:
    sa = {tuple(a[i:i + k]) for i in range(len(a) - k + 1)}
    sb = {tuple(b[i:i + k]) for i in range(len(b) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def run_dedup(tmp_path, texts_per_input: list[list[str]], cfg: DedupConfig | None = None) -> dict[int, str]:
    cfg = cfg or DedupConfig()
    hasher = MinHasher(cfg)
    exact_files, sig_files = [], []
    for i, texts in enumerate(texts_per_input):
        ex = tmp_path / f"{i}.exact.u64"
        sg = tmp_path / f"{i}.sig.u32"
        np.array([exact_hash(t) for t in texts], dtype=np.uint64).tofile(ex)
        np.array([hasher.signature(t) for t in texts], dtype=np.uint32).tofile(sg)
        exact_files.append(ex)
        sig_files.append(sg)
    return find_duplicates(exact_files, sig_files, cfg)


def test_exact_duplicates_after_normalisation_keep_the_first(tmp_path):
    a = " ".join(doc(1))
    texts = [a, " ".join(doc(2)), a.upper(), "  " + a.replace(" ", "\n  ") + " "]
    assert run_dedup(tmp_path, [texts[:2], texts[2:]]) == {2: "dedup.exact", 3: "dedup.exact"}


def test_near_duplicate_above_threshold_is_dropped(tmp_path):
    base = doc(3)
    near = mutate(base, 3, seed=4)
    assert jaccard(base, near) > 0.9
    dropped = run_dedup(tmp_path, [[" ".join(base)], [" ".join(doc(5)), " ".join(near)]])
    assert dropped == {2: "dedup.near"}


def test_documents_below_threshold_are_kept(tmp_path):
    base = doc(6)
    far = mutate(base, 60, seed=7)  # about a fifth of the words changed
    assert jaccard(base, far) < 0.5
    assert run_dedup(tmp_path, [[" ".join(base), " ".join(far)]]) == {}


def test_cluster_keeps_only_its_first_member(tmp_path):
    a = doc(8)
    b = mutate(a, 2, seed=9)
    c = mutate(b, 2, seed=10)
    dropped = run_dedup(tmp_path, [[" ".join(doc(11)), " ".join(c)], [" ".join(a), " ".join(b)]])
    # run order: unrelated, c, a, b -> c is the first member of the cluster {c, a, b}
    assert dropped == {2: "dedup.near", 3: "dedup.near"}


def test_signatures_are_seeded_and_deterministic():
    text = " ".join(doc(12))
    s1 = MinHasher(DedupConfig(seed=1)).signature(text)
    assert np.array_equal(s1, MinHasher(DedupConfig(seed=1)).signature(text))
    assert not np.array_equal(s1, MinHasher(DedupConfig(seed=2)).signature(text))
    assert s1.shape == (14 * 8,) and s1.dtype == np.uint32


@pytest.mark.parametrize("bands,rows", [(20, 5), (9, 13)])
def test_band_configuration(tmp_path, bands, rows):
    base = doc(13)
    near = mutate(base, 2, seed=14)
    cfg = DedupConfig(bands=bands, rows=rows, shingle_size=3)
    assert run_dedup(tmp_path, [[" ".join(base), " ".join(near), " ".join(doc(15))]], cfg) == {1: "dedup.near"}


def test_dedup_can_be_turned_off(tmp_path):
    a = " ".join(doc(16))
    assert run_dedup(tmp_path, [[a, a]], DedupConfig(exact=False, near=False)) == {}
    assert run_dedup(tmp_path, [[a, a]], DedupConfig(exact=False)) == {1: "dedup.near"}
