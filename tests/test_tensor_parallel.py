"""Tensor parallelism (DeepSpeed AutoTP training, ``train.tensor_parallel``) on CPU ranks over gloo.

- Units (in-process): the DeepSpeed config block and batch sizes, the partition dimension of
  every parameter of the tiny model, the refused combinations and shapes.
- Memory plan: the activation estimate per tensor-parallel rank (attention and SwiGLU split, the
  rest whole) against the CPU allocator's measurement of the AutoTP-sharded model on 2 in-process
  gloo ranks (within 20 %, as tests/test_activation_memory.py; measured 2 %), the model-state
  estimate and the ``--dry-run`` lines.
- One launch: tensor parallel 2 on 2 ranks (ZeRO-1) follows the 1-rank run of the same recipe
  (tests/model_parallel.py, session fixture ``mp_reference``) for 10 steps; the model directory
  written at the end (consolidated from both ranks' shards) equals the 1-rank run's; a rerun with
  ``train.max_steps=12`` resumes from step 10's checkpoint and trains on.

Tolerance of the 1-rank comparison: both ranks compute the same loss, but each rank's attention
and MLP work on half the heads / half the MLP width, the row-parallel outputs are sums of two
partial matrix products added by an all-reduce, and DeepSpeed all-reduces the gradients of the
replicated parameters (embedding, head, norms) over the group: fp32 rounding differs at ~1e-7
relative per step. AdamW normalises the updates and the model is tiny, so over 10 steps losses
stay within 1e-5 relative and the gradient norm within 1e-4 (as the sequence-parallel test;
measured below). A wrong split (shards concatenated on the wrong axis, a head count not taken from
the shard, replicated gradients not reduced, the norm counting a replicated parameter twice)
moves them by far more than that. The final weights are compared at 2e-5 absolute (weights
~0.05-1): AdamW divides each element's update by its own gradient scale, so for elements whose
gradient is near zero the ~1e-7 rounding is amplified; measured 6e-6 at most after 10 steps
(lr 3e-3, so 0.2 % of one update). Shards joined on the wrong axis or in the wrong order differ
by ~1e-1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crucible.errors import ConfigError
from model.tensor_parallel import PARTITION_CONFIG, partition_dim
from tests.model_parallel import GLOBAL_BATCH, STEPS, assert_follows, by_step, launch, records


def _cfg(**train):
    from crucible.config import load_config
    from training.config import PretrainConfig

    overrides = [f"train.{k}={v}" for k, v in train.items()]
    return load_config(PretrainConfig, "configs/pretrain/cpu_tiny.yaml", overrides)


# ------------------------------------------------------------------------------------ units

def test_deepspeed_config_has_the_autotp_block_and_counts_tensor_ranks_in_its_batch():
    from training.deepspeed_config import build_deepspeed_config, resolve_batch

    cfg = _cfg(tensor_parallel=2, zero_stage=1, global_batch_size=8, grad_accum_steps="null", micro_batch_size=4)
    ds = build_deepspeed_config(cfg.train, cfg.optim, data_parallel_size=1)
    assert ds["tensor_parallel"] == {"autotp_size": 2, "partition_config": PARTITION_CONFIG}
    # DeepSpeed checks micro x accumulation x world (2 ranks) before it knows the TP groups
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert resolve_batch(cfg.train, 1).global_batch_size == 8  # the samples per step stay the global batch
    assert ds["gradient_clipping"] == 1.0
    plain = build_deepspeed_config(_cfg(zero_stage=1, global_batch_size=8, grad_accum_steps="null",
                                        micro_batch_size=4).train, cfg.optim, data_parallel_size=1)
    assert "tensor_parallel" not in plain and plain["train_batch_size"] == 8


def test_partition_dim_of_every_parameter_of_the_tiny_model():
    from model.config import ModelConfig
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig(preset="tiny", vocab_size=256))
    got = {name: partition_dim(name) for name, _ in model.named_parameters()}
    split = {"attn.wq": 0, "attn.wk": 0, "attn.wv": 0, "mlp.w_gate": 0, "mlp.w_up": 0, "attn.wo": 1, "mlp.w_down": 1}
    want = {"embed.weight": None, "norm.weight": None, "lm_head.weight": None}
    for layer in range(2):
        want |= {f"layers.{layer}.attn_norm.weight": None, f"layers.{layer}.mlp_norm.weight": None}
        want |= {f"layers.{layer}.{module}.weight": dim for module, dim in split.items()}
    assert got == want
    assert "bias" not in "".join(model.state_dict())  # Linear's bias=None is registered but never saved
    assert partition_dim("module.layers.3.attn.wo.weight") == 1  # DeepSpeed's wrapper prefix


def test_refusals_name_what_to_change():
    from training.parallel import check_model_parallel

    train = _cfg(tensor_parallel=2, zero_stage=1).train
    check_model_parallel(train, n_layers=2, n_heads=4, kv_heads=2, hidden_dim=192)  # the tiny model splits
    for heads, kv, hidden in ((3, 3, 192), (4, 1, 192), (4, 2, 191)):
        with pytest.raises(ConfigError, match=r"train.tensor_parallel=2 must divide model.n_heads"):
            check_model_parallel(train, n_layers=2, n_heads=heads, kv_heads=kv, hidden_dim=hidden)
    refused = {
        "needs train.zero_stage 1 or 2 \\(got 3\\)": {"zero_stage": 3},
        "needs train.zero_stage 1 or 2 \\(got 0\\)": {"zero_stage": 0},
        "train.sequence_parallel=2 with train.tensor_parallel=2 is not supported": {"sequence_parallel": 2},
        "train.pipeline_stages=2 with train.tensor_parallel=2 is not supported": {"pipeline_stages": 2},
        "not supported with ZeRO-Offload": {"offload_optimizer": "cpu"},
        "not supported with train.compile=true": {"compile": "true"},
    }
    for message, train_keys in refused.items():
        with pytest.raises(ConfigError, match=message):
            _cfg(**{"tensor_parallel": 2, "zero_stage": 1, **train_keys})


def test_resuming_a_tensor_parallel_run_on_another_number_of_ranks_is_refused(monkeypatch, tmp_path):
    """A changed data-parallel size would need DeepSpeed's universal conversion, which was not
    verified for AutoTP checkpoints: every rank stops with the saved rank count (collectives and
    the checkpoint search stubbed: rank 0's view of 4 ranks resuming a 2-rank checkpoint)."""
    from crucible.errors import UserError
    from training import checkpoint as ckpt
    from training import trainer
    from training.engine import DistContext

    info = ckpt.CheckpointInfo(10, tmp_path / "step_00000010", {"world_size": 2, "zero_stage": 1})
    monkeypatch.setattr(trainer, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(ckpt, "resume_candidates", lambda run_dir, resume: [info])
    monkeypatch.setattr(ckpt, "select_checkpoint", lambda candidates, *args, **kwargs: candidates[0])
    ctx = DistContext(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    cfg = _cfg(tensor_parallel=2, zero_stage=1)
    with pytest.raises(UserError, match="train.tensor_parallel=2; resuming it on 4 ranks is not supported.*resume on 2 ranks"):
        trainer.plan_resume(cfg, ctx)


# --------------------------------------------------------------------------------- 2 ranks

@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_two_ranks_follow_one_rank_export_full_weights_and_resume(mp_manifest, mp_reference, tmp_path):
    from model.io import find_model_dir, load_weights

    run = tmp_path / "tp2"
    launch(run, mp_manifest, "train.tensor_parallel=2", num_gpus=2).check()
    assert_follows(run, mp_reference, "TP2")

    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "mp_rank_01_model_states.pt").is_file()  # each tensor-parallel rank saved its shard
    mine, theirs = load_weights(find_model_dir(run)), load_weights(find_model_dir(mp_reference))
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        assert mine[name].shape == tensor.shape, name  # full size, not a shard
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=2e-5, msg=name)

    logged = len(records(run))
    launch(run, mp_manifest, "train.tensor_parallel=2", "train.max_steps=12", num_gpus=2).check()
    more = by_step(records(run)[logged:], "train/loss")
    assert sorted(more) == [11, 12]  # resumed from step 10's checkpoint
    assert more[12]["consumed_samples"] == GLOBAL_BATCH * 12
    assert all(torch.isfinite(torch.tensor(rec["train/loss"])) for rec in more.values())


def test_consolidation_refuses_a_checkpoint_missing_a_tensor_rank(tmp_path: Path):
    from crucible.errors import DataError
    from model.zero_checkpoint import plan

    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"tensor_parallel": 2}')
    torch.save({"module": {}}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(DataError, match="mp_rank_01_model_states.pt \\(rank 1's model states\\) is missing"):
        plan(ckpt)


# ----------------------------------------------------------------------------- memory plan

def test_activation_estimate_splits_attention_and_mlp_but_not_norms_or_loss():
    from model.config import ModelConfig
    from model.memory import estimate_activation_memory

    cfg = ModelConfig(preset="tiny", vocab_size=256)  # C 64, Q 64, K 32, F 192, H 4
    one, two = (estimate_activation_memory(cfg, 2, 128, 4, 0, 0, device="cpu", tensor_parallel=t) for t in (1, 2))
    n = 2 * 128
    norms = n * (2 * 64 * (4 + 2 * 4) + 2 * 4)  # the two RMSNorms of a block, whole on every rank
    split = n * ((2 * 64 + 2 * 32 + 4 * 192) * 4 + 4 * 4)  # attention and SwiGLU tensors of a block
    assert one.block_bytes == norms + split and two.block_bytes == norms + split // 2
    assert (two.final_norm_bytes, two.loss_forward_bytes, two.loss_backward_bytes) == (
        one.final_norm_bytes, one.loss_forward_bytes, one.loss_backward_bytes)
    assert one.block_backward_bytes - two.block_backward_bytes == n * 192 * 4  # 2 N F s / 2
    with pytest.raises(ValueError, match="must be positive and divide n_heads"):
        estimate_activation_memory(cfg, 2, 128, 4, 0, 0, tensor_parallel=3)


def test_model_state_memory_counts_one_rank_s_shard_over_the_data_parallel_ranks():
    from model.config import ModelConfig
    from model.flops import num_params
    from model.tensor_parallel import params_per_rank, split_params
    from training.deepspeed_config import estimate_memory_per_gpu

    cfg = ModelConfig(preset="tiny", vocab_size=256)
    split = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192)  # two blocks' projections
    assert split_params(cfg) == split and params_per_rank(cfg, 2) == num_params(cfg) - split // 2
    train = _cfg(tensor_parallel=2, zero_stage=2).train
    gib = estimate_memory_per_gpu(train, num_params(cfg), 256 * 64, 8, 1, params_per_rank(cfg, 2))["gpu_gib"]
    p = params_per_rank(cfg, 2)  # DeepSpeed's ZeRO-2 formula: 2 P + 18 P / (data-parallel ranks = 8 / 2)
    assert gib * 1024**3 == pytest.approx(2 * p + int(18 * p / 4), abs=1)


def test_dry_run_prints_tensor_groups_and_memory_per_rank(mp_manifest, capsys):
    from launcher.pretrain import main

    common = ["--config", "configs/pretrain/cpu_tiny.yaml", "--dry-run", "--world-size", "4",
              f"data.manifests=[{mp_manifest}]", "train.zero_stage=1", "train.grad_accum_steps=null"]
    assert main([*common, "train.tensor_parallel=2"]) == 0
    out = capsys.readouterr().out
    assert "tensor-parallel groups (2 of 2 rank(s)): [0, 1], [2, 3]" in out
    assert "data-parallel size 2 = 4 ranks / tensor_parallel 2" in out
    assert "tensor parallel 2: 2 heads and 96 of the MLP width per rank" in out
    assert "the blocks' projections split 2 ways" in out
    assert main([*common, "train.tensor_parallel=4"]) == 2  # 2 key/value heads do not split 4 ways
    assert "must divide model.n_heads (4), the key/value heads (2)" in capsys.readouterr().err


# activations where they dwarf allocator noise (tests/test_activation_memory.py's shapes)
_ACT_BATCH, _ACT_SEQ = 2, 256


def _act_config():
    from model.config import ModelConfig

    return ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=_ACT_SEQ)


def _activation_rank(rank: int, world_size: int) -> dict:
    """One rank's measured activation bytes of the AutoTP-sharded model (and, on rank 0, of the
    whole model), plus the shape of a sharded projection."""
    import deepspeed

    from model.memory import measure_activation_memory
    from model.transformer import build_transformer
    from training.engine import build_engine, use_environment_ninja

    use_environment_ninja()
    deepspeed.init_distributed(dist_backend="gloo")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (_ACT_BATCH, _ACT_SEQ + 1), generator=g)
    out: dict = {}
    if rank == 0:
        out["whole"] = measure_activation_memory(build_transformer(_act_config(), seed=0), tokens[:, :-1],
                                                 tokens[:, 1:], loss_chunk_tokens=128)
    model = build_transformer(_act_config(), seed=0)
    config = {"train_batch_size": world_size, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              # no ZeRO: its gradient hooks would fill a 2 GB reduce bucket inside the measurement
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
              "tensor_parallel": {"autotp_size": world_size, "partition_config": PARTITION_CONFIG},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, _ = build_engine(model, config, None, model_parameters=list(model.parameters()))
    with torch.no_grad():  # the first forward runs DeepSpeed's check that the group's inputs agree
        engine.module(tokens[:, :-1])
    out["rank"] = measure_activation_memory(engine.module, tokens[:, :-1], tokens[:, 1:], loss_chunk_tokens=128)
    out["wk_shape"] = tuple(engine.module.layers[0].attn.wk.weight.shape)
    return out


@pytest.mark.distributed
def test_activation_estimate_per_tensor_rank_matches_the_measurement():
    from model.memory import estimate_activation_memory
    from tests.harness import run_on_ranks

    results = run_on_ranks(_activation_rank, 2)
    assert results[0]["wk_shape"] == (32, 128)  # 1 of 2 key/value heads of 32 dims: sharded
    whole = estimate_activation_memory(_act_config(), _ACT_BATCH, _ACT_SEQ, 4, 128, device="cpu").peak_bytes
    est = estimate_activation_memory(_act_config(), _ACT_BATCH, _ACT_SEQ, 4, 128, device="cpu",
                                     tensor_parallel=2).peak_bytes
    print(f"activations per rank, TP2: measured {[r['rank'] for r in results]} bytes, estimate {est}; "
          f"one rank, whole model: measured {results[0]['whole']}, estimate {whole}")
    for r in results:  # the bar of tests/test_activation_memory.py
        assert abs(est - r["rank"]) <= 0.2 * r["rank"], (est, r["rank"])
    assert max(r["rank"] for r in results) < 0.8 * results[0]["whole"]  # the split saves memory
