"""The Transformer: presets, construction and init, FLOPs/parameter accounting, model directory."""

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from crucible.config import dump_config, load_config
from crucible.errors import ConfigError, DataError
from model.config import ModelConfig, resolve_model_config
from model.flops import flops_per_token, num_params
from model.io import load_model_dir, save_model_dir
from model.transformer import Transformer, build_transformer


def tiny(**kw) -> ModelConfig:
    return resolve_model_config(ModelConfig(preset="tiny", **kw), vocab_size=384)


# ---------------------------------------------------------------- config and presets

def test_preset_applies_and_explicit_keys_win():
    cfg = ModelConfig(preset="125M", n_layers=3)
    assert (cfg.dim, cfg.n_heads, cfg.n_layers) == (768, 12, 3)
    assert resolve_model_config(cfg, vocab_size=1000).vocab_size == 1000
    assert resolve_model_config(cfg, vocab_size=1000).preset == "125M"


def test_resolve_is_idempotent_and_survives_yaml(tmp_path):
    cfg = resolve_model_config(ModelConfig(preset="cpu-small", rope_theta=5e5), vocab_size=777)
    assert resolve_model_config(cfg) == cfg
    path = tmp_path / "m.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(ModelConfig, path)
    assert again == cfg and resolve_model_config(again, 777) == cfg


def test_preset_under_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: 7B\n")
    cfg = load_config(ModelConfig, path, ["n_kv_heads=8"])
    assert cfg.dim == 4096 and cfg.n_kv_heads == 8 and cfg.hidden_dim == 11008


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*tiny, cpu-small"):
        load_config(ModelConfig, None, ["preset=huge"])


@pytest.mark.parametrize("override,match", [
    (["dim=100", "n_heads=3"], "divisible by model.n_heads"),
    (["n_heads=4", "n_kv_heads=3"], "multiple of model.n_kv_heads"),
    (["dim=12", "n_heads=4"], "must be even"),
    (["rope_theta=-1"], "rope_theta must be positive"),
])
def test_impossible_shapes_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ModelConfig, None, override)


# Llama 2's published parameter counts (vocabulary 32000).
@pytest.mark.parametrize("name,count", [("7B", 6_738_415_616), ("13B", 13_015_864_320),
                                        ("70B", 68_976_648_192)])
def test_llama2_parameter_counts(name, count):
    assert num_params(resolve_model_config(ModelConfig(preset=name), 32000)) == count


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "125M", "350M", "1.3B"])
@pytest.mark.parametrize("tie", [False, True])
def test_num_params_matches_module(name, tie):
    cfg = resolve_model_config(ModelConfig(preset=name, tie_embeddings=tie), 5000)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


@pytest.mark.parametrize("name,seq_len", [("tiny", 64), ("cpu-small", 32)])
def test_flops_per_token_matches_flop_counter(name, seq_len):
    cfg = resolve_model_config(ModelConfig(preset=name), 512)
    model = build_transformer(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len))
    counter = FlopCounterMode(display=False)
    # The CPU flash kernel is not registered with the counter; the math kernel is made of
    # counted matmuls (full, not causal-halved: the convention flops_per_token documents).
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(tokens).sum().backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, seq_len) * tokens.numel(),
                                                      rel=1e-12)


# ---------------------------------------------------------------- construction and init

@pytest.mark.parametrize("tie", [False, True])
def test_meta_then_init_weights_equals_direct_construction(tie):
    cfg = tiny(tie_embeddings=tie)
    torch.manual_seed(3)
    direct = Transformer(cfg)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    lazy.to_empty(device="cpu")
    torch.manual_seed(3)
    lazy.init_weights()
    a, b = direct.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (lazy.lm_head.weight is lazy.embed.weight) == tie
    torch.manual_seed(4)
    lazy.init_weights()
    assert not torch.equal(lazy.embed.weight, direct.embed.weight)


def test_init_distribution():
    cfg = resolve_model_config(ModelConfig(preset="cpu-small", init_std=0.05), 4096)
    model = build_transformer(cfg, seed=0)
    block = model.layers[0]
    scaled = 0.05 / math.sqrt(2 * cfg.n_layers)
    assert block.attn.wq.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert block.mlp.w_up.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert block.mlp.w_down.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert block.attn.wo.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.dim))
    flat = build_transformer(cfg.model_copy(update={"init_depth_scaled": False}), seed=0)
    assert flat.layers[0].mlp.w_down.weight.std().item() == pytest.approx(0.05, rel=0.02)


def test_forward_shape_and_causality():
    cfg = tiny()
    model = build_transformer(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    logits = model(tokens)
    assert logits.shape == (2, 20, cfg.vocab_size)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % cfg.vocab_size
    other = model(changed)
    assert torch.equal(logits[:, :12], other[:, :12])
    assert not torch.allclose(logits[:, 12:], other[:, 12:])


def test_rope_theta_changes_the_model():
    a = build_transformer(tiny(), seed=0)
    b = build_transformer(tiny(rope_theta=500.0), seed=0)
    tokens = torch.randint(0, 384, (1, 16))
    assert torch.equal(a(tokens)[:, 0], b(tokens)[:, 0])  # position 0 is not rotated
    assert not torch.allclose(a(tokens)[:, 1:], b(tokens)[:, 1:])


def test_activation_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = build_transformer(tiny(activation_checkpointing=ckpt), seed=0).train()
        tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
        model(tokens).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- model directory

@pytest.mark.parametrize("tie", [False, True])
def test_model_dir_round_trip_is_bit_exact(tmp_path, tie):
    cfg = tiny(tie_embeddings=tie, rope_theta=20000.0)
    model = build_transformer(cfg, seed=0)
    out = save_model_dir(tmp_path / "m", model.state_dict(), cfg, provenance={"origin": "test"})
    assert json.loads((out / "provenance.json").read_text()) == {"origin": "test"}
    assert ModelConfig.model_validate_json((out / "model_config.json").read_text()) == cfg
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) != tie
    loaded, loaded_cfg = load_model_dir(out)
    assert loaded_cfg == cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    tokens = torch.randint(0, 384, (2, 10))
    assert torch.equal(model(tokens), loaded(tokens))


def test_save_rejects_mismatched_state_dict(tmp_path):
    cfg = tiny()
    sd = build_transformer(cfg, seed=0).state_dict()
    with pytest.raises(ValueError, match="missing.*layers.1"):
        save_model_dir(tmp_path, {k: v for k, v in sd.items() if not k.startswith("layers.1.")}, cfg)
    with pytest.raises(ValueError, match="unexpected.*module.embed"):
        save_model_dir(tmp_path, {"module." + k: v for k, v in sd.items()}, cfg)


def test_load_rejects_non_model_dir(tmp_path):
    with pytest.raises(DataError, match="not a model directory"):
        load_model_dir(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps(tiny().model_dump()))
    with pytest.raises(DataError, match="no model.safetensors"):
        load_model_dir(tmp_path)


def test_find_model_dir_in_run_and_checkpoint_dirs(tmp_path, caplog):
    """Model layer only, with a marker as older versions wrote it (no file list) and an
    absolute latest.json from before the run directory moved; the run-directory cases with
    markers the trainer writes are in tests/test_checkpoint_recovery.py."""
    from model.io import find_model_dir

    cfg = tiny()
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    save_model_dir(ckpt / "model", build_transformer(cfg, seed=0).state_dict(), cfg, provenance={})
    (ckpt / "COMPLETE.json").write_text(json.dumps({"step": 10, "world_size": 1, "zero_stage": 0}))
    assert find_model_dir(ckpt) == ckpt / "model"
    (run / "latest.json").write_text(json.dumps(
        {"tag": "step_00000010", "step": 10, "model_dir": "/moved/away/model"}))
    with caplog.at_level("WARNING"):
        assert find_model_dir(run) == ckpt / "model"  # the checkpoint inside, never the old place
    assert "/moved/away/model, outside this run directory" in caplog.text
    model, _ = load_model_dir(run)
    assert model.cfg == cfg
    (ckpt / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="no checkpoint with a whole model directory.*model.safetensors is missing or empty"):
        find_model_dir(run)
    (run / "latest.json").unlink()
    (ckpt / "COMPLETE.json").unlink()
    with pytest.raises(DataError, match="run directory without a complete checkpoint"):
        find_model_dir(run)
