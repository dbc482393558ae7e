"""Validation that means something: bytes per token from the tokenizer, bits per byte against a
hand computation, and per-source validation on a 2-rank run over two manifests of different text
(English web text, and repeated multilingual UDHR sentences), checked against the final model
by hand.

Tolerances: bits per byte from fp32 log-softmax of logits of order 1 over 512 ids is within
~1e-7 relative of the float64 value per token, and a sum of positive terms keeps that relative
error, so 1e-6 relative holds with margin. The 2-rank run's losses come from its fp32 forward
passes and are compared with a float64 forward pass of the same weights here: the fp32 matmuls of
a 2-layer, 64-wide model are within ~1e-6 relative of float64, so 1e-5 relative; a lost or
doubled micro batch, a filler row counted, or a wrong weighting moves them by more than 1e-3.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.datasets import SAMPLE, read_split_samples, sample_texts, shared_token_dataset
from tests.harness import ROOT, run_deepspeed

UDHR = SAMPLE / "lang" / "udhr"


@pytest.fixture(scope="module")
def english(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def sp(english):
    from data_pipeline.tokenizer.folder import load_sentencepiece

    return load_sentencepiece(english.parent.parent / "tokenizer")


def _udhr_texts() -> list[str]:
    """One document per paragraph of the bundled UDHR translations (Arabic, Chinese, Japanese,
    Russian, ...): text unlike the English web sample, much of it byte-fallback."""
    texts = []
    for path in sorted(UDHR.glob("*.txt")):
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


@pytest.fixture(scope="module")
def repeated(english, tmp_path_factory) -> Path:
    """Token shards of a few UDHR sentences (several languages, much of it byte-fallback)
    repeated as numbered documents, written with the English sample's tokenizer (sources must
    share it): text a model learns within a few steps, so its loss ends far below the English
    web text's."""
    from data_pipeline.shards.config import ShardConfig
    from data_pipeline.shards.writer import write_token_shards

    sentences = [" ".join(_udhr_texts()[i:i + 2]) for i in range(0, len(_udhr_texts()), 150)]
    documents = [f"{n}. {text}" for n in range(40) for text in sentences]
    out = tmp_path_factory.mktemp("sources") / "repeated" / "shards"
    write_token_shards(documents, english.parent.parent / "tokenizer", out,
                       ShardConfig(seq_len=64, samples_per_shard=128, validation_fraction=0.2))
    return out / "manifest.json"


def test_byte_lengths_sum_to_the_utf8_length_of_the_decoded_text(sp):
    from data_pipeline.tokenizer.byte_lengths import token_byte_lengths

    table = token_byte_lengths(sp, size=600)
    assert table.shape == (600,) and not table[sp.get_piece_size():].any()
    assert table[[sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()]].tolist() == [0, 0, 0, 0]
    english = [t for _, t in zip(range(40), sample_texts(), strict=False)]
    byte_pieces = 0
    for text in english + _udhr_texts()[::10]:
        ids = sp.encode(text)
        byte_pieces += sum(sp.is_byte(i) for i in ids)
        assert table[ids].sum() == len(sp.decode(ids).encode("utf-8")) == len(text.encode("utf-8")), text
    assert byte_pieces > 100  # the byte-fallback rule was exercised (Arabic and Chinese)


def test_byte_lengths_count_the_dummy_prefix_space(tmp_path):
    """A tokenizer with add_dummy_prefix encodes a leading "▁" that decode strips: one byte more
    per text than its UTF-8 length (the documented exception)."""
    import sentencepiece as spm

    from data_pipeline.tokenizer.byte_lengths import token_byte_lengths

    texts = [line.strip() for line in (UDHR / "eng.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "m"),
                                   vocab_size=400, add_dummy_prefix=True, byte_fallback=True,
                                   minloglevel=2)
    with_prefix = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    table = token_byte_lengths(with_prefix)
    for text in texts[:10]:
        ids = with_prefix.encode(text)
        assert table[ids].sum() == len(text.encode("utf-8")) + 1 == len(with_prefix.decode(ids).encode()) + 1


def test_bits_per_byte_equals_a_hand_computation(sp):
    from data_pipeline.tokenizer.byte_lengths import token_byte_lengths
    from training.steps.language_model import next_token_sums, validation_metrics

    text = "The cat sat on the mat. Ça coûte 5 €: 漢字!"
    ids = [sp.bos_id(), *sp.encode(text), sp.eos_id()]  # BOS and EOS decode to no text
    targets = ids[1:]
    # what the targets decode to, by hand: 24 ASCII bytes "The cat sat on the mat. ", "Ça" 3,
    # " coûte" 7, " 5" 2, " €" 4, ":" 1, " " 1, "漢字" 6, "!" 1
    n_bytes = 24 + 3 + 7 + 2 + 4 + 1 + 1 + 6 + 1
    assert n_bytes == len(text.encode("utf-8"))
    g = torch.Generator().manual_seed(0)
    vocab = sp.get_piece_size()
    logits = torch.randn(2, len(targets), vocab, generator=g)  # (2, T, V) fp32; row 1: filler
    nats = 0.0
    for t, target in enumerate(targets):  # -log softmax(z)[target], in float64
        z = logits[0, t].tolist()
        top = max(z)
        nats += top + math.log(sum(math.exp(v - top) for v in z)) - z[target]
    rows = torch.tensor([targets, targets[::-1]])
    sums = next_token_sums(logits, rows, torch.tensor([True, False]),
                           torch.from_numpy(token_byte_lengths(sp)))
    torch.testing.assert_close(sums, torch.tensor([nats, len(targets), n_bytes], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    metrics = validation_metrics("val", ["text"], *([v] for v in sums.tolist()))
    want_bpb = nats / math.log(2) / n_bytes
    for key, want in (("val/bits_per_byte", want_bpb), ("val/text/bits_per_byte", want_bpb),
                      ("val/loss", nats / len(targets)), ("val/text/loss", nats / len(targets))):
        assert metrics[key] == pytest.approx(want, rel=1e-6), key


def test_source_names_are_short_stable_and_unique():
    from data_pipeline.loader.evaluation import share_evenly, source_names

    assert source_names(["runs/web/shards/manifest.json", "runs/web/shards", "data/code/manifest.json",
                         "s3://bucket/web/shards/manifest.json", "x/my corpus!/manifest.json"]) == \
        ["web", "web_2", "code", "web_3", "my_corpus"]
    assert share_evenly(10, [100, 100, 100]) == [4, 3, 3]
    assert share_evenly(10, [2, 100]) == [2, 5]  # a small source gives what it has


def _hand_full_pass(model, manifest: Path, table: np.ndarray) -> tuple[float, int, int]:
    """nats, target tokens and bytes of every validation sample, in float64 on one process."""
    rows = torch.from_numpy(np.stack([np.frombuffer(b, dtype="<u2") for b in
                                      read_split_samples(manifest, "validation")]).astype(np.int64))
    with torch.no_grad():
        logits = model(rows[:, :-1]).double()  # (N, T, V)
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
    return float(nats), rows[:, 1:].numel(), int(table[rows[:, 1:].numpy()].sum())


@pytest.mark.slow
@pytest.mark.distributed
def test_per_source_validation_on_two_manifests(english, repeated, sp, tmp_path):
    from data_pipeline.loader.evaluation import share_evenly
    from data_pipeline.tokenizer.byte_lengths import token_byte_lengths
    from model.io import load_model_dir

    run = tmp_path / "run"
    micro, eval_batches, planned = 4, 2, 2
    run_deepspeed(ROOT / "launcher" / "pretrain.py", [
        "--config", "configs/pretrain/cpu_tiny.yaml", f"run_dir={run}",
        f"data.manifests=[{english},{repeated}]", "data.weights=[0.5,0.5]", "train.max_steps=24", "optim.lr=1e-2",
        f"train.micro_batch_size={micro}", "train.eval_every=12", f"train.eval_batches={eval_batches}",
        "checkpoint.every=0", "log.every=1", "model.tie_embeddings=true",
    ], num_gpus=2, timeout=240, log_dir=tmp_path / "logs").check()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sizes = [len(read_split_samples(m, "validation")) for m in (english, repeated)]
    names = ["token_dataset", "repeated"]
    subset = share_evenly(eval_batches * micro * planned, sizes)
    assert subset == [8, 8]

    def weighted(rec: dict, prefix: str, counts: list[int]) -> float:
        return sum(rec[f"{prefix}/{n}/loss"] * c for n, c in zip(names, counts, strict=True)) / sum(counts)

    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    for rec in evals:
        assert rec["val/loss"] == pytest.approx(weighted(rec, "val", subset), rel=1e-12)
        assert rec["val/perplexity"] == pytest.approx(math.exp(rec["val/loss"]), rel=1e-12)
        assert {f"val/{n}/bits_per_byte" for n in names} <= set(rec) and "val/bits_per_byte" in rec
    full = [r for r in records if "val_full/loss" in r]
    assert len(full) == 1 and full[0]["step"] == 24
    full = full[0]
    assert full["val_full/loss"] == pytest.approx(weighted(full, "val_full", sizes), rel=1e-12)
    # the sources' losses differ: the repeated sentences are learnt within the 24 steps
    assert full["val_full/token_dataset/loss"] - full["val_full/repeated/loss"] > 0.5

    # the 2-rank full pass equals a float64 pass over every validation sample of the final model
    latest = json.loads((run / "latest.json").read_text())
    model, _ = load_model_dir(run / latest["model_dir"])
    model = model.double().eval()
    table = token_byte_lengths(sp)
    totals = [0.0, 0, 0]
    for name, manifest in zip(names, (english, repeated), strict=True):
        nats, tokens, nbytes = _hand_full_pass(model, manifest, table)
        totals = [totals[0] + nats, totals[1] + tokens, totals[2] + nbytes]
        assert full[f"val_full/{name}/loss"] == pytest.approx(nats / tokens, rel=1e-5), name
        assert full[f"val_full/{name}/bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert full["val_full/bits_per_byte"] == pytest.approx(totals[0] / math.log(2) / totals[2], rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = EventAccumulator(str(run / "tensorboard"))
    tensorboard.Reload()
    tags = set(tensorboard.Tags()["scalars"])
    assert {"val/repeated/loss", "val/token_dataset/bits_per_byte", "val/bits_per_byte",
            "val_full/loss", "val_full/repeated/bits_per_byte"} <= tags
