"""Scaled rotary embeddings (model.rope_scaling: llama3, yarn) agree with Hugging Face's exactly:
frequencies, logits of the exported model, and the import back."""

import json

import pytest
import torch

from crucible.errors import DataError
from model.config import ModelConfig, resolve_model_config
from model.convert import export_hf
from model.hf_mapping import from_hf_config, to_hf_config
from model.io import load_model_dir, read_hf_dir, save_model_dir
from model.rope import rope_frequencies
from model.transformer import build_transformer

VOCAB = 96
ORIGINAL = 64  # the "pretrained" context; the tests run past it
SCALINGS = {
    "llama3": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-deepseek-mscale": {"type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                             "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False,
                             "original_max_position_embeddings": ORIGINAL},
}


def scaled(name: str, **kw) -> ModelConfig:
    # tiny: head_dim 16, so the 8 frequencies' wavelengths (6 to 10000 positions) span all of
    # each scaling's regions (kept, blended, divided) at an original context of 64.
    spec = {"preset": "tiny", "init_std": 0.1, "max_seq_len": 256, "rope_theta": 5000.0, **kw}
    if name != "none":
        spec["rope_scaling"] = SCALINGS[name]
    return resolve_model_config(ModelConfig(**spec), vocab_size=VOCAB)


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(**to_hf_config(cfg))


@pytest.mark.parametrize("name", SCALINGS)
def test_frequencies_equal_transformers_rope_init_functions(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = scaled(name)
    ours = rope_frequencies(cfg)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[cfg.rope_scaling.type](hf_config(cfg), None)
    # The same formulas in the same order and dtype: equal bit for bit.
    torch.testing.assert_close(ours.inv_freq, theirs, rtol=0, atol=0)
    assert ours.attention_factor == attention_factor
    plain = rope_frequencies(scaled("none")).inv_freq
    assert not torch.equal(ours.inv_freq, plain)  # the scaling changed something...
    assert ours.inv_freq[0] == plain[0]  # ...but not the highest frequency (kept by both types)


@pytest.mark.parametrize("name", ["llama3", "yarn"])
def test_scaled_model_exports_to_llama_for_causal_lm_and_imports_back(tmp_path, name):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = scaled(name)
    ours = build_transformer(cfg, seed=1).eval()
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg)
    export_hf(tmp_path / "m", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    assert exported.config.rope_parameters["rope_type"] == name
    # The same weights in a LlamaForCausalLM built from the scaling's own parameters.
    reference = LlamaForCausalLM(hf_config(cfg)).eval()
    reference.load_state_dict(exported.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(tokens)
        unscaled = build_transformer(scaled("none"), seed=1).eval()(tokens)
        # fp32, the same cos/sin tables bit for bit; only the attention kernels' summation order
        # differs (ours vs HF's sdpa call), which moves logits of size ~1 by ~1e-6.
        torch.testing.assert_close(exported(tokens).logits, logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(reference(tokens).logits, logits, rtol=0, atol=1e-5)
    assert (unscaled - logits).abs().max() > 1e-2  # the scaling is not a no-op at 160 > 64

    back, back_cfg = load_model_dir(tmp_path / "hf")
    assert back_cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), logits, rtol=0, atol=0)  # same weights, same code
    # from config.json alone (no record of ours): the same rotary embedding
    (tmp_path / "hf" / "crucible_model_config.json").unlink()
    bare_cfg, _ = read_hf_dir(tmp_path / "hf")
    assert bare_cfg.rope_scaling == cfg.rope_scaling and bare_cfg.max_seq_len == cfg.max_seq_len


def test_hf_made_yarn_model_imports_with_equal_logits(tmp_path):
    """A YaRN LlamaForCausalLM saved by transformers (legacy rope_scaling, derived factor)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.1, rope_theta=5000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    )).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model_dir(tmp_path / "hf")
    assert (cfg.rope_scaling.type, cfg.rope_scaling.factor, cfg.rope_theta) == ("yarn", 4.0, 5000.0)
    tokens = torch.randint(0, VOCAB, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_hf_config_scalings_read_with_transformers_defaults():
    base = to_hf_config(scaled("none"))
    yarn = {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "beta_fast": None}}
    cfg = from_hf_config(yarn)  # no factor, no original length: transformers' defaults
    assert (cfg.rope_scaling.original_max_position_embeddings, cfg.rope_scaling.factor,
            cfg.rope_scaling.beta_fast) == (256, 1.0, 32.0)
    with pytest.raises(DataError, match="rope_type='linear' is not supported"):
        from_hf_config({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(DataError, match="llama3 scaling needs a factor"):
        from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    assert "rope_scaling" not in base and json.dumps(to_hf_config(scaled("llama3")))


@pytest.mark.parametrize(("scaling", "message"), [
    ({"type": "none", "factor": 2.0}, "type=none does not use model.rope_scaling.factor"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "high_freq_factor": 8.0},
     "type=yarn does not use model.rope_scaling.high_freq_factor"),
    ({"type": "llama3", "factor": 2.0}, "needs model.rope_scaling.original_max_position_embeddings"),
    ({"type": "yarn", "original_max_position_embeddings": 8}, "needs model.rope_scaling.factor"),
    ({"type": "llama3", "factor": 0.5, "original_max_position_embeddings": 8}, "at least 1"),
    ({"type": "llama3", "factor": 2.0, "original_max_position_embeddings": 8, "low_freq_factor": 4.0},
     "low_freq_factor < high_freq_factor"),
])
def test_rope_scaling_config_refuses_what_it_would_ignore_or_cannot_use(scaling, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(rope_scaling=scaling)


@pytest.mark.parametrize("name", ["cpu_extend_context.yaml", "gpu_7b_extend_32k.yaml"])
def test_context_extension_recipes_scale_by_their_context_growth(name):
    from crucible.config import load_config
    from tests.harness import ROOT
    from training.config import PretrainConfig

    path = ROOT / "configs" / "pretrain" / name
    for overrides in ([], ["model.rope_scaling.type=llama3"]):  # the recipes' switch to Llama 3.1's
        model = load_config(PretrainConfig, path, overrides).model
        scaling = model.rope_scaling
        assert scaling.type == ("llama3" if overrides else "yarn")
        assert scaling.factor == model.max_seq_len / scaling.original_max_position_embeddings
        assert scaling.original_max_position_embeddings < model.max_seq_len
