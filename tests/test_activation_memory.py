"""Selective activation checkpointing and the activation-memory estimate behind ``--dry-run``."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from crucible.config import load_config
from model.config import ModelConfig
from model.memory import estimate_activation_memory, measure_activation_memory
from model.transformer import Block, build_transformer

# Shapes where activations dwarf allocator noise: 2 x 256 tokens, width 128, 4 blocks.
BATCH, SEQ, VOCAB = 2, 256, 512


def _config(**overrides) -> ModelConfig:
    shape = {"dim": 128, "n_layers": 4, "n_heads": 4, "vocab_size": VOCAB, "max_seq_len": SEQ, **overrides}
    return ModelConfig(**shape)


def _batch(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


@pytest.mark.parametrize(("dtype", "checkpointing", "chunk", "shape"), [
    (torch.float32, False, 128, {}),
    (torch.float32, True, 128, {}),
    (torch.float32, 2, 0, {}),
    (torch.bfloat16, False, 128, {}),
    (torch.bfloat16, False, 0, {"n_kv_heads": 1}),
    (torch.bfloat16, 2, 128, {"n_kv_heads": 2}),
    (torch.bfloat16, True, 128, {"vocab_size": 4096}),
    (torch.float32, 3, 0, {"n_layers": 6}),
], ids=["fp32-none-chunked", "fp32-all-chunked", "fp32-k2-full", "bf16-none-chunked", "bf16-none-full-mqa",
        "bf16-k2-chunked-gqa", "bf16-all-chunked-vocab4k", "fp32-k3-full-6layers"])
def test_activation_estimate_is_within_20_percent_of_the_cpu_measurement(dtype, checkpointing, chunk, shape):
    cfg = _config(activation_checkpointing=checkpointing, **shape)
    model = build_transformer(cfg, seed=0, dtype=dtype)
    measured = measure_activation_memory(model, *_batch(cfg.vocab_size), loss_chunk_tokens=chunk)
    estimate = estimate_activation_memory(cfg, BATCH, SEQ, dtype.itemsize, chunk, device="cpu")
    # 20 %: the bar; the formula counts every large tensor, so it lands within a few %.
    assert abs(estimate.peak_bytes - measured) <= 0.2 * measured, (
        f"estimate {estimate.peak_bytes} ({estimate.peak_phase}) vs measured {measured}")


def test_checkpointing_every_other_block_holds_between_none_and_all():
    tokens, targets = _batch()
    measured = {k: measure_activation_memory(build_transformer(_config(activation_checkpointing=k), seed=0),
                                             tokens, targets, loss_chunk_tokens=128) for k in (0, 2, 1)}
    # measured 8.5 / 14.3 / 25.3 MB: half the blocks recomputed save ~45 %, all of them ~65 %
    assert measured[1] < 0.7 * measured[2] and measured[2] < 0.7 * measured[0], measured
    estimates = {k: estimate_activation_memory(_config(), BATCH, SEQ, 4, 128, checkpoint_every=k).peak_bytes
                 for k in (0, 2, 1)}
    assert estimates[0] > estimates[2] > estimates[1]


def test_checkpointing_every_kth_block_recomputes_blocks_0_k_2k_with_the_same_gradients(monkeypatch):
    calls: list[int] = []
    forward = Block.forward

    def counted(self, *args, **kwargs):
        calls.append(self.index)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counted)
    grads = {}
    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    for k in (0, 2, 3):
        cfg = ModelConfig(dim=64, n_layers=5, n_heads=4, vocab_size=384, max_seq_len=16, activation_checkpointing=k)
        model = build_transformer(cfg, seed=0).train()
        for i, block in enumerate(model.layers):
            block.index = i
        calls.clear()
        model(tokens, targets=tokens, loss_chunk_tokens=8).backward()
        recomputed = sorted(i for i in set(calls) if calls.count(i) == 2)
        assert recomputed == ([] if k == 0 else list(range(0, 5, k))), (k, calls)
        grads[k] = {n: p.grad for n, p in model.named_parameters()}
    for k in (2, 3):
        for name, grad in grads[0].items():
            # recomputation repeats the same fp32 kernels on the same inputs: identical up to
            # reduction-order noise
            torch.testing.assert_close(grads[k][name], grad, rtol=0, atol=1e-6)


def test_activation_checkpointing_takes_a_bool_or_a_block_interval():
    assert [ModelConfig(activation_checkpointing=v).checkpoint_every for v in (False, True, 0, 1, 4)] == [0, 1, 0, 1, 4]
    with pytest.raises(ValueError, match="block interval k >= 1, got -2"):
        ModelConfig(activation_checkpointing=-2)


def test_estimate_names_the_phase_and_counts_recomputed_blocks():
    cfg = _config(n_layers=5)
    est = estimate_activation_memory(cfg, BATCH, SEQ, 2, 0, checkpoint_every=2)
    assert est.checkpointed_blocks == 3  # blocks 0, 2, 4
    assert est.blocks_bytes == 2 * est.block_bytes + 3 * BATCH * SEQ * cfg.dim * 2
    # block 4, the first to run backward, is recomputed on top of every other block's tensors
    assert est.peak_phase == "block backward" and est.peak_bytes == max(est.phases().values())
    assert estimate_activation_memory(cfg, BATCH, SEQ, 2, 0, checkpoint_every=3).peak_phase == "loss backward"
    with pytest.raises(ValueError, match="dtype_bytes"):
        estimate_activation_memory(cfg, BATCH, SEQ, 8, 0)


# ---------------------------------------------------------------- --dry-run

@pytest.fixture(scope="module")
def token_manifest(tmp_path_factory) -> Path:
    from tests.datasets import shared_token_dataset

    return shared_token_dataset(tmp_path_factory)


def test_dry_run_prints_activations_total_and_checkpoint_bytes_per_rank(capsys, token_manifest):
    from launcher.pretrain import main
    from model.flops import num_params
    from training.config import PretrainConfig
    from training.steps.language_model import model_config_for

    args = ["model.activation_checkpointing=2", f"data.manifests=[{token_manifest},{token_manifest}]"]
    assert main(["--config", "configs/pretrain/gpu_7b_zero3.yaml", "--dry-run", "--world-size", "16", *args]) == 0
    out = capsys.readouterr().out
    recipe = load_config(PretrainConfig, "configs/pretrain/gpu_7b_zero3.yaml", args)
    model = model_config_for(recipe, 512, 64)  # the shards' vocabulary and seq_len
    est = estimate_activation_memory(model, 4, 64, 2, recipe.train.loss_chunk_tokens, 2)
    assert "micro batch 4 x 64 tokens (the shards' seq_len), bf16" in out
    assert f"checkpointing blocks 0, 2, 4, ...: {math.ceil(model.n_layers / 2)} of 32 blocks" in out
    assert f"{est.peak_bytes / 1024**3:8.2f} GiB at the peak ({est.peak_phase})" in out
    state = float(re.search(r"([\d.]+) GiB per GPU.*<- this plan", out).group(1))
    total = re.search(r"total per GPU for this plan: ([\d.]+) GiB model state \+ ([\d.]+) GiB activations = ([\d.]+)", out)
    assert float(total.group(1)) == state and float(total.group(3)) == pytest.approx(state + est.peak_bytes / 1024**3, abs=0.01)
    # ZeRO-3 on 16 ranks: every rank writes 12 bytes per parameter / 16 and its norm gains
    shard = math.ceil(num_params(model) / 16) * 12 + (2 * 32 + 1) * model.dim * 2
    assert f"rank 0: {shard / 1024**3:8.2f} GiB ({shard:,} bytes)" in out
    assert f"other ranks: {shard / 1024**3:8.2f} GiB ({shard:,} bytes)" in out
    assert "timed at 1 GB/s per rank, an assumed default" in out


def test_checkpoint_bytes_follow_the_zero_stage():
    from training.config import TrainConfig
    from training.dry_run import checkpoint_bytes_per_rank

    model, params = _config(), 1_000_000
    stage2 = checkpoint_bytes_per_rank(TrainConfig(zero_stage=2, precision="bf16"), model, params, 4, False)
    assert stage2 == {"rank 0": {"optimizer shard": 3_000_000, "module weights (bf16)": 2_000_000},
                      "other ranks": {"optimizer shard": 3_000_000}}
    with_model_dir = checkpoint_bytes_per_rank(TrainConfig(zero_stage=3, precision="bf16"), model, params, 4, True)
    assert with_model_dir["rank 0"]["model directory (fp32 safetensors)"] == 4_000_000
    assert "model directory (fp32 safetensors)" not in with_model_dir["other ranks"]
    single = checkpoint_bytes_per_rank(TrainConfig(zero_stage=0, precision="fp32"), model, params, 1, False)
    assert single == {"rank 0": {"module weights + whole optimizer state": 12_000_000}, "other ranks": {}}
