"""Contamination check: n-gram overlap between evaluation sets and pretraining token shards."""

import json

import numpy as np

from data_pipeline.clean.output import atomic_tar_writer
from training.tasks.contamination import contamination_report, ngram_hashes


def _write_shards(tmp_path, samples):
    with atomic_tar_writer(tmp_path / "train-000000.tar") as w:
        for i, s in enumerate(samples):
            w.write({"__key__": f"{i:08d}", "tokens": np.asarray(s, dtype="<u2").tobytes()})
    manifest = {"dtype": "uint16", "seq_len": len(samples[0]) - 1,
                "splits": {"train": [{"path": "train-000000.tar", "samples": len(samples)}],
                           "validation": []}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "manifest.json"


def test_ngram_hashes_windows():
    h = ngram_hashes(np.arange(10), 4)
    assert len(h) == 7 and len(set(h.tolist())) == 7
    assert np.array_equal(ngram_hashes(np.array([5, 1, 2, 3, 4]), 4)[1:], ngram_hashes(np.array([1, 2, 3, 4]), 4))
    assert len(ngram_hashes(np.arange(3), 4)) == 0


def test_contaminated_example_is_found(tmp_path):
    rng = np.random.default_rng(0)
    pretrain = [rng.integers(10, 5000, 65) for _ in range(20)]
    leaked = list(pretrain[7][20:40])                      # 20 tokens copied from pretraining
    clean = list(rng.integers(10, 5000, 30))
    near = list(pretrain[3][:12]) + [1] + list(pretrain[3][13:25])  # no 13 tokens in a row
    manifest = _write_shards(tmp_path, pretrain)
    report = contamination_report({"dev": [leaked, clean], "test": [near, clean, clean]}, [manifest], n=13)
    assert report["dev"]["contaminated"] == 1 and report["dev"]["fraction"] == 0.5
    assert report["test"]["contaminated"] == 0
    assert report["dev"]["pretrain_ngrams_scanned"] == 20 * (65 - 12)
