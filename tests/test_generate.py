"""Generation: KV cache, greedy parity with Hugging Face generate, sampling, EOS, the launcher."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig, resolve_model_config
from model.generate import SamplingConfig, filter_logits, generate
from model.io import save_model_dir
from model.transformer import build_transformer
from tests.test_hf import train_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 512
PAD = 3


@pytest.fixture(scope="module")
def model():
    cfg = resolve_model_config(ModelConfig(preset="tiny", init_std=0.1), vocab_size=VOCAB)
    return build_transformer(cfg, seed=0).eval()


def _prompts(lengths=(5, 17, 1, 9), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_kv_cache_matches_full_forward(model):
    """Greedy decoding with the cache picks the argmax of a full forward pass at every step."""
    prompt = _prompts((7,))[0]
    new = generate(model, [prompt], SamplingConfig(max_new_tokens=12, eos_id=None))[0]
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        full = model(seq)[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert full == new


@pytest.mark.parametrize("tie,theta", [(True, 50000.0)])  # GQA, tied, non-default theta
def test_greedy_batch_matches_hf_generate(tmp_path, tie, theta):
    from transformers import AutoModelForCausalLM

    from model.convert import export_hf

    cfg = resolve_model_config(ModelConfig(preset="tiny", init_std=0.1, tie_embeddings=tie,
                                           rope_theta=theta), vocab_size=VOCAB)
    ours = build_transformer(cfg, seed=5).eval()
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg)
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    prompts = _prompts()
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention = (ids != PAD).long()
    for row, p in enumerate(prompts):
        attention[row, width - len(p):] = 1
    ref = hf.generate(input_ids=ids, attention_mask=attention, max_new_tokens=40, do_sample=False,
                      pad_token_id=PAD, eos_token_id=None)[:, width:].tolist()
    got = generate(ours, prompts, SamplingConfig(max_new_tokens=40, eos_id=None), pad_id=PAD)
    assert all(len(g) == 40 for g in got)
    assert got == ref


def test_batching_does_not_change_a_prompt_continuation(model):
    prompts = _prompts()
    batch = generate(model, prompts, SamplingConfig(max_new_tokens=20, eos_id=None), pad_id=PAD)
    alone = [generate(model, [p], SamplingConfig(max_new_tokens=20, eos_id=None))[0] for p in prompts]
    assert batch == alone


def test_stops_at_eos_per_row(model):
    prompts = _prompts((6, 11))
    free = generate(model, prompts, SamplingConfig(max_new_tokens=16, eos_id=None))
    eos = free[0][4]  # the 5th token of the first row becomes its end of sequence
    got = generate(model, prompts, SamplingConfig(max_new_tokens=16, eos_id=eos))
    assert got[0] == free[0][:free[0].index(eos)]
    assert got[1] == (free[1][:free[1].index(eos)] if eos in free[1] else free[1])


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompts = _prompts((4, 8))
    sampled = SamplingConfig(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7, eos_id=None)
    a, b = generate(model, prompts, sampled), generate(model, prompts, sampled)
    assert a == b
    other = generate(model, prompts, SamplingConfig(max_new_tokens=15, temperature=1.0, seed=8, eos_id=None))
    assert other != a
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=15, eos_id=None))
    top1 = generate(model, prompts, SamplingConfig(max_new_tokens=15, temperature=0.7, top_k=1,
                                                   seed=3, eos_id=None))
    assert top1 == greedy


def test_filter_logits_matches_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.95):
        ref = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(filter_logits(logits, None, top_p), ref)
    ref = TopKLogitsWarper(7)(None, logits.clone())
    assert torch.equal(filter_logits(logits, 7, None), ref)
    assert (filter_logits(logits, 7, None) > float("-inf")).sum(-1).tolist() == [7] * 4


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


@pytest.mark.slow
def test_generate_launcher(tmp_path):
    tok_dir = train_tiny_tokenizer(tmp_path / "tok")
    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=VOCAB)
    save_model_dir(tmp_path / "m", build_transformer(cfg, seed=0).state_dict(), cfg, tokenizer_dir=tok_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The fire\nPrime Minister John Howard said\n", encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "launcher/generate.py"), "--model", str(tmp_path / "m"),
           "--prompt", "Hello", "--prompts-file", str(prompts), "--max-new-tokens", "8", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    import json

    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "The fire", "Prime Minister John Howard said"]
    assert all(0 < len(r["new_token_ids"]) <= 8 for r in rows)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    for r in rows:
        assert r["prompt_token_ids"] == [2] + sp.encode(r["prompt"])  # EOS first, as in the shards
        assert r["prompt"] + r["completion"] == sp.decode(r["prompt_token_ids"] + r["new_token_ids"])
    bad = subprocess.run([sys.executable, str(ROOT / "launcher/generate.py"), "--model",
                          str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
