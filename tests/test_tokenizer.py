"""Tokenizer training, Hugging Face parity, sampling and long-line handling."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from crucible.config import load_config
from crucible.errors import ConfigError, DataError
from data_pipeline.clean.output import clean_shard_paths
from data_pipeline.config import DataPrepConfig
from data_pipeline.tokenizer.config import TokenizerConfig
from data_pipeline.tokenizer.hf import build_hf_tokenizer
from data_pipeline.tokenizer.sample import sample_documents
from data_pipeline.tokenizer.train import split_long_line, train_tokenizer
from tests.datasets import SAMPLE, sample_texts, shared_token_dataset
from tests.harness import ROOT, cpu_env

EDGE_CASES = [
    "", " ", "  two leading spaces", "trailing spaces   ", "tab\tseparated\tvalues",
    "line one\nline two\n\n\nthree blank lines", "digits 1234567890 and 3.14159",
    "emoji 🙂 and CJK 漢字 and Cyrillic Привет", "\u00a0non-breaking\u2009thin", "</s> is text here",
    "A" * 3000,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory).parent.parent / "tokenizer"


def _udhr_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((SAMPLE / "lang" / "udhr").glob("*.txt"))]


@pytest.mark.slow
def test_hf_autotokenizer_ids_equal_sentencepiece_ids(tok_dir):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = list(sample_texts()) + _udhr_texts() + EDGE_CASES
    mismatched = [t[:60] for t in texts if hf(t, add_special_tokens=False).input_ids != sp.encode(t)]
    assert not mismatched, mismatched[:3]
    # BOS/EOS behaviour (documented): neither adds them, with or without add_special_tokens
    assert hf("hello world").input_ids == sp.encode("hello world")
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    for text in EDGE_CASES[:9]:
        assert sp.decode(sp.encode(text)) == text  # identity normalisation keeps whitespace
        assert hf.decode(sp.encode(text)) == text


def test_tokenizer_folder_and_report(tok_dir):
    for name in ("tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
                 "report.json", "provenance.json", "config.yaml"):
        assert (tok_dir / name).is_file(), name
    report = json.loads((tok_dir / "report.json").read_text())
    assert report["vocab_size"] == 512
    assert report["ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert 1.0 < report["bytes_per_token"] < 6 and 1.0 < report["tokens_per_word"] < 5
    assert report["heldout_documents"] > 0 and report["hf_mismatched_documents"] == 0
    vocab = (tok_dir / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 512 and vocab[0].split("\t")[0] == "<unk>"
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.encode("2024") == [sp.piece_to_id(c) for c in "2024"]  # split digits


def test_unigram_and_user_symbols_match_hf(tmp_path):
    cfg = TokenizerConfig(vocab_size=600, model_type="unigram", heldout_documents=20,
                          user_defined_symbols=["<|user|>", "<|assistant|>"])
    report = train_tokenizer(list(sample_texts())[:200], cfg, tmp_path)
    assert report["model_type"] == "unigram" and report["hf_mismatched_documents"] == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    hf = build_hf_tokenizer(tmp_path / "tokenizer.model")
    text = "<|user|>What is 12+30?<|assistant|> It is 42."
    ids = sp.encode(text)
    assert sp.piece_to_id("<|user|>") in ids and sp.piece_to_id("<|assistant|>") in ids
    # (unigram only: literal "</s>" in text is a documented exception)
    for t in [text, *[e for e in EDGE_CASES if "</s>" not in e], *list(sample_texts())[200:260]]:
        assert hf(t, add_special_tokens=False).input_ids == sp.encode(t), t[:60]


def test_sample_is_seeded_order_independent_and_bounded():
    texts = [f"document number {i} " * (1 + i % 7) for i in range(500)]
    train, held, seen = sample_documents(texts, 50, 5, 10**9, seed=3)
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert sample_documents(shuffled, 50, 5, 10**9, seed=3) == (train, held, seen)
    assert seen == 500 and len(train) == 50 and len(held) == 5 and not set(train) & set(held)
    assert sample_documents(texts, 50, 5, 10**9, seed=4)[0] != train
    small_train, _, _ = sample_documents(texts, 50, 5, 2000, seed=3)
    assert sum(len(t) for t in small_train) <= 2000


def test_long_lines_are_split_not_lost():
    line = ("word " * 5000) + "x" * 5000 + " é" * 3000
    parts = split_long_line(line, 1024)
    assert "".join(parts) == line
    assert all(len(p.encode()) <= 1024 for p in parts)
    assert split_long_line("short", 1024) == ["short"]


def test_training_counts_split_lines(tmp_path):
    long_doc = " ".join(sample_texts().__next__().split()) * 3  # one line, several KB
    texts = [long_doc] + list(sample_texts())[1:120]
    cfg = TokenizerConfig(vocab_size=400, max_sentence_length=1024, heldout_documents=0)
    report = train_tokenizer(texts, cfg, tmp_path)
    assert report["long_lines_split"] >= 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        load_config(DataPrepConfig, None, ["tokenizer.vocab_size=100"])
    with pytest.raises(ConfigError, match="tokenizer.model_type"):
        load_config(DataPrepConfig, None, ["tokenizer.model_type=wordpiece"])
    with pytest.raises(ConfigError, match="tokenizer.character_coverage"):
        load_config(DataPrepConfig, None, ["tokenizer.character_coverage=0.5"])


def test_training_is_reproducible(tmp_path):
    cfg = TokenizerConfig(vocab_size=400, heldout_documents=10)
    texts = list(sample_texts())[:100]
    a = train_tokenizer(texts, cfg, tmp_path / "a")
    b = train_tokenizer(list(reversed(texts)), cfg, tmp_path / "b")  # sample is order independent
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()


def test_a_raw_folder_is_not_taken_for_an_unfinished_cleaning_run(tmp_path):
    """A folder of raw files was never a cleaning output: say so and show the clean command,
    instead of "the cleaning run did not finish; rerun it"; an unfinished run is told apart."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text('{"text": "hello"}\n')
    (raw / "b.txt").write_text("world\n")
    proc = subprocess.run([sys.executable, "launcher/build_tokenizer.py", f"input={raw}", f"output={tmp_path / 'tok'}"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{raw} is not the output of a cleaning run (no docs-*.tar, stats.json or _SUCCESS; it holds a.jsonl, b.txt)" in proc.stderr
    assert f"python launcher/clean.py input={raw} output=<clean folder>" in proc.stderr
    assert "did not finish" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "tok").exists()

    unfinished = tmp_path / "clean"
    (unfinished / "_work").mkdir(parents=True)  # what a stopped launcher/clean.py leaves
    with pytest.raises(DataError, match=r"has no _SUCCESS marker: the cleaning run that writes it did not "
                                        r"finish .* rerun the same launcher/clean.py command"):
        clean_shard_paths(unfinished)
