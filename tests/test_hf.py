"""Exact Hugging Face conversion both ways: logits, round trip, tokenizer, sharding, refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from crucible.errors import DataError
from model.config import ModelConfig, resolve_model_config
from model.convert import export_hf, write_hf_tokenizer
from model.hf_mapping import from_hf_config, from_hf_state_dict, to_hf_key, to_hf_state_dict
from model.io import load_model_dir, read_hf_dir, save_model_dir
from model.transformer import build_transformer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
VOCAB = 512

# GQA and multi-head, tied and untied, default and other rotary bases.
CONFIGS = {
    "gqa-untied": {"n_kv_heads": 2, "tie_embeddings": False},
    "gqa-tied-theta5e5": {"n_kv_heads": 2, "tie_embeddings": True, "rope_theta": 500000.0},
    "mha-untied-theta1234": {"n_kv_heads": None, "tie_embeddings": False, "rope_theta": 1234.0},
}


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = VOCAB) -> Path:
    """A sentencepiece model on the bundled news sample: ids unk 0, bos 1, eos 2, pad 3."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer.model").is_file():
        spm.SentencePieceTrainer.train(
            input=str(SAMPLE / "news/lee_abc/lee_background.cor"), model_prefix=str(out_dir / "tokenizer"),
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
            eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
        )
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tiny(**kw) -> ModelConfig:
    # A larger init than training uses, so that logits differ clearly between tokens.
    return resolve_model_config(ModelConfig(preset="tiny", init_std=0.1, **kw), vocab_size=VOCAB)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def _tokens(seed: int = 0, shape=(3, 48)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_hf_logits_equal(tmp_path, tokenizer_dir, name):
    cfg = tiny(**CONFIGS[name])
    ours = build_transformer(cfg, seed=1).eval()
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg, tokenizer_dir=tokenizer_dir)
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf = hf_model(tmp_path / "hf")
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert hf.config.num_key_value_heads == cfg.kv_heads
    tokens = _tokens()
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_to_ours_logits_equal(tmp_path, name):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = CONFIGS[name]
    torch.manual_seed(2)
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=spec["n_kv_heads"] or 4,
        max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        tie_word_embeddings=spec["tie_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": spec.get("rope_theta", 10000.0)},
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model_dir(tmp_path / "hf")
    assert cfg.hidden_dim == 160 and cfg.rope_theta == spec.get("rope_theta", 10000.0)
    assert (ours.lm_head.weight is ours.embed.weight) == spec["tie_embeddings"]
    tokens = _tokens(1)
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_ours_hf_ours_is_bit_identical(tmp_path, name):
    cfg = tiny(**CONFIGS[name])
    ours = build_transformer(cfg, seed=3)
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg)
    export_hf(tmp_path / "m", tmp_path / "hf")
    back, back_cfg = load_model_dir(tmp_path / "hf")
    assert back_cfg == cfg
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and from the bare HF config.json alone (no record of ours): same shapes and weights
    (tmp_path / "hf" / "crucible_model_config.json").unlink()
    bare_cfg, sd = read_hf_dir(tmp_path / "hf")
    assert (bare_cfg.dim, bare_cfg.hidden_dim, bare_cfg.kv_heads, bare_cfg.rope_theta,
            bare_cfg.tie_embeddings) == (cfg.dim, cfg.hidden_dim, cfg.kv_heads, cfg.rope_theta,
                                         cfg.tie_embeddings)
    assert all(torch.equal(sd[k], a[k]) for k in sd)


def test_rope_uses_hf_rotate_half_layout():
    """Our rotation pairs dims (i, i + D/2), so q/k rows need no permutation on conversion."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from model.rope import default_inv_freq, rope_cos_sin
    from model.transformer import apply_rope, rotate_half, signed_sin

    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    positions = torch.arange(10)
    cos, sin = rope_cos_sin(default_inv_freq(16, 777.0), positions, torch.float32)
    hq, hk = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    ssin = signed_sin(sin)
    assert torch.equal(apply_rope(q, cos, ssin), hq) and torch.equal(apply_rope(k, cos, ssin), hk)
    assert torch.equal(q * cos + rotate_half(q) * sin, hq)
    # An interleaved (Meta-style) rotation of the same q would differ.
    assert not torch.allclose(apply_rope(q[..., torch.arange(16).view(2, 8).t().flatten()], cos, ssin), hq)


def test_sharded_export_loads(tmp_path, tokenizer_dir):
    cfg = tiny()
    ours = build_transformer(cfg, seed=4).eval()
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg, tokenizer_dir=tokenizer_dir)
    export_hf(tmp_path / "m", tmp_path / "hf", max_shard_bytes=150_000)
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(to_hf_state_dict(ours.state_dict(), cfg))
    tokens = _tokens(2)
    with torch.no_grad():
        assert (hf_model(tmp_path / "hf")(tokens).logits - ours(tokens)).abs().max() <= 1e-5
    back, _ = load_model_dir(tmp_path / "hf")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_export_bf16(tmp_path):
    cfg = tiny()
    ours = build_transformer(cfg, seed=5)
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg)
    export_hf(tmp_path / "m", tmp_path / "hf", dtype="bfloat16")
    back, back_cfg = load_model_dir(tmp_path / "hf")
    assert back_cfg.dtype == "bfloat16" and back.embed.weight.dtype == torch.bfloat16
    assert torch.equal(back.embed.weight, ours.embed.weight.to(torch.bfloat16))


def test_exported_tokenizer_matches_sentencepiece(tmp_path, tokenizer_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    cfg = tiny()
    save_model_dir(tmp_path / "m", build_transformer(cfg, seed=0).state_dict(), cfg, tokenizer_dir=tokenizer_dir)
    assert (tmp_path / "m" / "tokenizer.model").is_file()
    export_hf(tmp_path / "m", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    lines = (SAMPLE / "news/lee_abc/lee.cor").read_text(encoding="latin-1").splitlines()[:20]
    lines += ["  two  spaces and trailing  ", "tab\there\nnewline", "ﬁ café ＡＢＣ £300"]
    for line in lines:
        ids = sp.encode(line)
        assert tok(line, add_special_tokens=False).input_ids == ids
        assert tok.decode(ids) == sp.decode(ids)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)


def test_export_copies_hf_tokenizer_files_when_present(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    hf_tok_dir = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, hf_tok_dir)
    write_hf_tokenizer(tokenizer_dir, hf_tok_dir)  # tokenizer.json + tokenizer_config.json
    cfg = tiny()
    save_model_dir(tmp_path / "m", build_transformer(cfg, seed=0).state_dict(), cfg, tokenizer_dir=hf_tok_dir)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    export_hf(tmp_path / "m", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (hf_tok_dir / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id == 3


@pytest.mark.parametrize("patch,match", [
    ({"attention_bias": True}, "no biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "only default, llama3 and yarn"),
    ({"hidden_act": "gelu"}, "SwiGLU"),
    ({"model_type": "mistral"}, "only Llama"),
    ({"head_dim": 32}, "head_dim"),
])
def test_unsupported_hf_configs_are_refused(patch, match):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    assert from_hf_config(base).dim == 64
    with pytest.raises(DataError, match=match):
        from_hf_config({**base, **patch})


def test_pickled_hf_weights_are_refused(tmp_path):
    cfg = tiny()
    save_model_dir(tmp_path / "m", build_transformer(cfg, seed=0).state_dict(), cfg)
    export_hf(tmp_path / "m", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DataError, match="pickled"):
        load_model_dir(tmp_path / "hf")


def test_hf_names_cover_every_tensor_both_ways():
    cfg = tiny()
    sd = build_transformer(cfg, seed=0).state_dict()
    hf = to_hf_state_dict(sd, cfg)
    assert len(hf) == len(sd) and "model.layers.1.self_attn.k_proj.weight" in hf
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (cfg.kv_heads * cfg.head_dim, cfg.dim)
    back = from_hf_state_dict({**hf, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, cfg)
    assert back.keys() == sd.keys() and all(back[k] is hf[to_hf_key(k)] for k in sd)
    with pytest.raises(DataError, match="unknown tensor"):
        from_hf_state_dict({"model.layers.0.self_attn.q_proj.bias": torch.ones(3)}, cfg)
