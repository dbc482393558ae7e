"""Unit tests of the pretraining parts that need no ranks: DeepSpeed config generation and the
batch check, LR schedules, weight-decay groups, the skipping optimizer, checkpoint markers /
keep-last / resume selection, RNG round trip, fault policies, metrics helpers."""

import itertools
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from crucible.config import load_config
from crucible.errors import ConfigError, UserError
from training import checkpoint as ckpt
from training.callbacks.spikes import LossSpikeDetector
from training.config import OptimConfig, PretrainConfig, ScheduleConfig, TrainConfig
from training.deepspeed_config import (
    build_deepspeed_config,
    check_device_support,
    estimate_memory_per_gpu,
    resolve_batch,
)
from training.faults import BadStepPolicy, TrainingDiverged
from training.metrics import device_peak_tflops, gpu_peak_tflops, measure_cpu_gemm_tflops, mfu
from training.optim import SkippingAdamW, param_groups
from training.schedule import lr_at

# ------------------------------------------------------------------------- DeepSpeed config

def test_batch_arithmetic_error_shows_all_four_numbers():
    train = TrainConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=24)
    with pytest.raises(ConfigError) as err:
        resolve_batch(train, 2)
    msg = str(err.value)
    for number in ("24", "4", "2", "16"):
        assert number in msg
    assert "train.global_batch_size" in msg and "data-parallel size (2)" in msg
    assert "grad_accum_steps=3" in msg  # 24 / (4 x 2)


def test_accumulation_is_derived_from_the_global_batch_on_any_gpu_count():
    train = TrainConfig(micro_batch_size=16, global_batch_size=512)
    assert [resolve_batch(train, gpus).grad_accum_steps for gpus in (1, 2, 8, 32)] == [32, 16, 4, 1]
    assert resolve_batch(TrainConfig(micro_batch_size=3), 4).grad_accum_steps == 1
    with pytest.raises(ConfigError) as err:
        resolve_batch(train, 3)
    assert "512" in str(err.value) and "16" in str(err.value) and "(3) = 48" in str(err.value)
    with pytest.raises(ConfigError, match=r"= 1024"):
        resolve_batch(train, 64)  # 16 x 64 GPUs is already more than the global batch


def test_batch_arithmetic_ok_and_default_global():
    assert resolve_batch(TrainConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=16), 2) \
        .global_batch_size == 16
    assert resolve_batch(TrainConfig(micro_batch_size=3, grad_accum_steps=5), 4).global_batch_size == 60


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    train = TrainConfig(zero_stage=stage, micro_batch_size=2, grad_accum_steps=3)
    config = build_deepspeed_config(train, OptimConfig(grad_clip=0.5), 4)
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"]["stage"] == stage
    # stage 0: our optimizer clips (so it can report the norm); DeepSpeed must not clip twice
    assert config["gradient_clipping"] == (0.0 if stage == 0 else 0.5)
    assert "optimizer" not in config and "fp16" not in config and "bf16" not in config
    json.dumps(config)


def test_deepspeed_config_fp16_bf16_offload():
    fp16 = build_deepspeed_config(TrainConfig(precision="fp16", zero_stage=2), OptimConfig(), 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    bf16 = build_deepspeed_config(TrainConfig(precision="bf16", zero_stage=3), OptimConfig(), 1)
    assert bf16["bf16"]["enabled"] and bf16["data_types"]["grad_accum_dtype"] == "fp32"
    off = build_deepspeed_config(
        TrainConfig(zero_stage=3, offload_optimizer="nvme", offload_params="cpu", nvme_path="/nvme"),
        OptimConfig(), 8)
    zero = off["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    assert zero["offload_param"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False
    ds_adam = build_deepspeed_config(TrainConfig(zero_stage=1), OptimConfig(implementation="deepspeed",
                                                                            weight_decay=0.05), 1)
    assert ds_adam["optimizer"]["type"] == "AdamW"
    assert ds_adam["optimizer"]["params"]["weight_decay"] == 0.05


def test_fp16_refused_on_cpu_with_clear_message():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_device_support(TrainConfig(precision="fp16"), "cpu")
    check_device_support(TrainConfig(precision="fp16"), "cuda")


def test_offload_rules_name_the_keys():
    with pytest.raises(ValueError, match="offload_params"):
        TrainConfig(zero_stage=2, offload_params="cpu")
    with pytest.raises(ValueError, match="nvme_path"):
        TrainConfig(zero_stage=3, offload_optimizer="nvme")


def test_memory_estimates_shrink_with_zero3():
    total, largest = 7_000_000_000, 32000 * 4096
    z1 = estimate_memory_per_gpu(TrainConfig(zero_stage=1, precision="bf16"), total, largest, 8, 1)
    z3 = estimate_memory_per_gpu(TrainConfig(zero_stage=3, precision="bf16"), total, largest, 8, 1)
    z0 = estimate_memory_per_gpu(TrainConfig(zero_stage=0, precision="bf16"), total, largest, 8, 1)
    assert z3["gpu_gib"] < z1["gpu_gib"] < z0["gpu_gib"]
    assert z0["gpu_gib"] == pytest.approx(total * 18 / 1024**3)


# ----------------------------------------------------------------------------- schedules

def _sched(**kw):
    return ScheduleConfig(**kw)


def test_warmup_then_cosine_reaches_min_lr():
    s = _sched(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 1.0, s, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, s, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, s, 100) == pytest.approx(1.0)
    assert lr_at(99, 1.0, s, 100) == pytest.approx(0.1)
    mid = lr_at(10 + 89 // 2, 1.0, s, 100)
    assert 0.5 < mid < 0.6
    values = [lr_at(i, 1.0, s, 100) for i in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_linear_constant_and_wsd():
    lin = _sched(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, 2.0, lin, 11) == pytest.approx(2.0)
    assert lr_at(5, 2.0, lin, 11) == pytest.approx(1.0)
    assert lr_at(10, 2.0, lin, 11) == pytest.approx(0.0)
    const = _sched(kind="constant", warmup_steps=4)
    assert lr_at(1, 1.0, const, 50) == pytest.approx(0.5)
    assert lr_at(49, 1.0, const, 50) == 1.0
    wsd = _sched(kind="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(50, 1.0, wsd, 101) == 1.0
    assert lr_at(80, 1.0, wsd, 101) == 1.0  # decay starts at 80% of the steps
    assert lr_at(90, 1.0, wsd, 101) == pytest.approx(0.5)
    assert lr_at(100, 1.0, wsd, 101) == pytest.approx(0.0)


# ---------------------------------------------------------------------- optimizer behaviour

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.gain = torch.nn.Parameter(torch.ones(4))


def test_weight_decay_only_on_matrices_by_default():
    model = _Tiny()
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model.proj.weight)}
    all_decay = param_groups(model, OptimConfig(decay_norms_and_embeddings=True))
    assert len(all_decay) == 1 and len(all_decay[0]["params"]) == 4


def test_skipping_adamw_skips_nonfinite_and_clips_at_stage0():
    model = torch.nn.Linear(3, 1)
    opt = SkippingAdamW(model.parameters(), lr=0.1, clip_grad=1.0)
    before = model.weight.detach().clone()
    model(torch.ones(2, 3)).sum().mul(float("nan")).backward()
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert torch.equal(model.weight, before)
    opt.zero_grad()
    model(torch.ones(2, 3)).sum().mul(100).backward()
    opt.step()
    assert not opt.last_step_skipped and opt._global_grad_norm > 100
    assert not torch.equal(model.weight, before)
    assert math.isfinite(model.weight.sum().item())


# ---------------------------------------------------------------------------- checkpoints

def _make_ckpt(run_dir, step, complete=True):
    path = ckpt.checkpoint_root(run_dir) / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "shard.pt").write_bytes(b"x")
    if complete:
        ckpt.mark_complete(path, {"step": step, "world_size": 2, "zero_stage": 1})
    return path


def test_resume_selects_newest_complete_and_prune_keeps_last(tmp_path):
    _make_ckpt(tmp_path, 10)
    _make_ckpt(tmp_path, 20)
    _make_ckpt(tmp_path, 25, complete=False)  # a crash mid-save
    _make_ckpt(tmp_path, 30)
    _make_ckpt(tmp_path, 40, complete=False)  # a save in progress: never pruned
    assert ckpt.find_resume_checkpoint(tmp_path, "auto").step == 30
    assert ckpt.find_resume_checkpoint(tmp_path, "never") is None
    assert json.loads((tmp_path / ckpt.LATEST).read_text())["step"] == 30
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000025"]
    left = sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir())
    assert left == ["step_00000020", "step_00000030", "step_00000040"]


def test_resume_explicit_path_must_be_complete(tmp_path):
    path = _make_ckpt(tmp_path, 5, complete=False)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path, str(path))
    assert ckpt.find_resume_checkpoint(tmp_path, str(_make_ckpt(tmp_path, 6))).step == 6
    assert ckpt.find_resume_checkpoint(tmp_path / "empty", "auto") is None


def test_resume_refuses_other_model_or_tokenizer():
    model = {"dim": 64, "n_layers": 2, "vocab_size": 512, "activation_checkpointing": False}
    state = {"model_config": model, "tokenizer_sha256": "a" * 64}
    ckpt.check_compatible(state, {**model, "activation_checkpointing": True}, "a" * 64)
    with pytest.raises(ckpt.CheckpointMismatch, match="model.dim: checkpoint 64 vs now 128"):
        ckpt.check_compatible(state, {**model, "dim": 128}, "a" * 64)
    with pytest.raises(ckpt.CheckpointMismatch, match="tokenizer"):
        ckpt.check_compatible(state, model, "b" * 64)


def test_rng_state_round_trip(tmp_path):
    import numpy as np

    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    ckpt.write_rng_state(tmp_path, 0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert ckpt.restore_rng_state(tmp_path, 0)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
    assert not ckpt.restore_rng_state(tmp_path, 7)


# ---------------------------------------------------------------------------- faults, metrics

def test_bad_step_policy_stops_after_k_in_a_row():
    policy = BadStepPolicy(max_consecutive=3)
    policy.record(0, True, float("nan"), 1.0)
    policy.record(1, False, 2.0, 1.0)
    policy.record(2, True, float("nan"), 1.0)
    policy.record(3, True, 2.0, float("inf"))
    with pytest.raises(TrainingDiverged, match="3 consecutive steps up to step 4"):
        policy.record(4, True, float("nan"), 1.0)
    assert policy.total_skipped == 4


def test_loss_spike_detector():
    det = LossSpikeDetector(factor=2.0, warmup=3)
    assert not any(det.update(i, 3.0) for i in range(5))
    assert det.update(5, 10.0) and det.spikes == [5]
    assert not det.update(6, float("nan"))


def test_mfu_and_peaks():
    assert mfu(1000.0, 6e9, 1.0, 2) == pytest.approx(3.0)
    assert device_peak_tflops(torch.device("cpu"), "fp32", override=12.5) == 12.5
    measured = measure_cpu_gemm_tflops(256, repeats=2)
    assert 1e-4 < measured < 100
    assert mfu(1000.0, 6e9, None, 2) is None


@pytest.mark.parametrize("name,precision,tf32,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4), ("NVIDIA H100 PCIe", "bf16", False, 756.5),
    ("NVIDIA H100 NVL", "bf16", False, 835.5), ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA H200 NVL", "bf16", False, 835.5), ("NVIDIA A100-SXM4-40GB", "bf16", False, 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156.0), ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
    ("NVIDIA L4", "bf16", False, 121.0), ("NVIDIA L40", "bf16", False, 181.0),
    ("NVIDIA L40S", "bf16", False, 362.1), ("NVIDIA B200", "bf16", False, 2250.0),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7), ("Tesla V100-SXM2-32GB", "bf16", False, None),
    ("NVIDIA GH200 480GB", "bf16", False, None), ("NVIDIA L40 Super", "bf16", False, None),
])
def test_gpu_peaks_match_whole_device_names(name, precision, tf32, peak):
    assert gpu_peak_tflops(name, precision, tf32=tf32) == peak


def test_cpu_tiny_recipe_loads():
    cfg = load_config(PretrainConfig, "configs/pretrain/cpu_tiny.yaml")
    assert cfg.train.zero_stage in (0, 1, 2, 3)


# ---------------------------------------------------------------------------- launcher checks

@pytest.fixture(scope="module")
def token_manifest(tmp_path_factory) -> Path:
    from tests.datasets import shared_token_dataset

    return shared_token_dataset(tmp_path_factory)


def test_dry_run_prints_deepspeed_config_and_memory(capsys, token_manifest):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/gpu_7b_zero3.yaml", "--dry-run", "--world-size", "16",
               f"data.manifests=[{token_manifest},{token_manifest}]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert '"train_batch_size": 1024' in out and '"stage": 3' in out and '"gradient_accumulation_steps": 16' in out
    assert "GiB per GPU" in out and "2 node(s) x 8 GPU(s)" in out and "from --world-size" in out
    plan = next(line for line in out.splitlines() if "<- this plan" in line)
    assert "2 node(s) x 8 GPU(s)" in plan
    # the model takes the shards' vocabulary (512), not model.vocab_size
    assert "vocabulary 512 from the tokenizer" in out
    assert "data: 2 manifest(s), seq_len 64" in out


def test_dry_run_plans_for_the_gpus_the_recipe_was_written_for(capsys, token_manifest):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/gpu_7b_zero3.yaml", "--dry-run",
               f"data.manifests=[{token_manifest},{token_manifest}]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "data-parallel size 32, from train.planned_world_size" in out
    assert '"gradient_accumulation_steps": 8' in out  # 1024 / (4 x 32)
    assert "4 node(s) x 8 GPU(s)" in next(line for line in out.splitlines() if "<- this plan" in line)


def test_planned_world_size_is_derived_from_a_fixed_batch_arithmetic():
    from training.deepspeed_config import planned_world_size

    assert planned_world_size(TrainConfig(planned_world_size=12))[0] == 12
    assert planned_world_size(TrainConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=64))[0] == 8
    assert planned_world_size(TrainConfig(micro_batch_size=4, global_batch_size=64)) == (
        1, "default: the recipe sets no train.planned_world_size")


def test_dry_run_without_a_plan_says_to_pass_world_size(capsys, token_manifest):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/gpu_125m_zero1.yaml", "--dry-run", f"data.manifests=[{token_manifest}]",
               "train.planned_world_size=null", "train.micro_batch_size=24"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.global_batch_size (512) is not a multiple of" in err
    assert "pass --world-size N" in err and "train.planned_world_size" in err


def test_dry_run_names_a_missing_manifest_and_the_command_that_builds_it(capsys):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/gpu_125m_zero1.yaml", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "deepspeed config (data-parallel size 8" in captured.out  # the plan is printed first
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "data.manifests: data/tokens/web/manifest.json does not exist" in err
    assert "python launcher/shard.py --config configs/data/<data recipe>.yaml" in err and "output=data/tokens/web" in err
    rc = main(["--config", "configs/pretrain/cpu_tiny.yaml", "--dry-run", "data.manifests=[runs/nowhere/shards/manifest.json]"])
    assert rc == 2
    assert "`python launcher/prepare_data.py --config configs/data/<data recipe>.yaml output=runs/nowhere`" in \
        capsys.readouterr().err


def test_the_missing_sample_manifest_names_the_readme_command():
    from training.steps.language_model import build_command

    assert build_command("runs/sample/shards/manifest.json") == (
        "python launcher/prepare_data.py --config configs/data/sample.yaml output=runs/sample")


def test_dry_run_refuses_an_explicit_context_shorter_than_the_shards(capsys, token_manifest):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/cpu_tiny.yaml", "--dry-run", f"data.manifests=[{token_manifest}]",
               "model.max_seq_len=32"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "the token shards hold sequences of 64 tokens but model.max_seq_len is set to 32" in captured.err
    assert "data-parallel size 2, from train.planned_world_size" in captured.out


def test_model_context_follows_the_shards_unless_set():
    from model.config import ModelConfig
    from training.steps.language_model import model_config_for

    recipe = load_config(PretrainConfig, "configs/pretrain/cpu_tiny.yaml")  # tiny: 128, not set
    assert model_config_for(recipe, 512, 256).max_seq_len == 256
    assert model_config_for(recipe, 512, 64).max_seq_len == 128  # the preset's context holds the shards
    explicit = load_config(PretrainConfig, "configs/pretrain/cpu_tiny.yaml", ["model.max_seq_len=128"])
    with pytest.raises(UserError, match="model.max_seq_len is set to 128"):
        model_config_for(explicit, 512, 256)
    longer = load_config(PretrainConfig, "configs/pretrain/cpu_tiny.yaml", ["model.max_seq_len=512"])
    assert model_config_for(longer, 512, 256).max_seq_len == 512
    # the resolved config is what is saved and compared on resume: reloaded, it resolves the same
    resolved = model_config_for(recipe, 512, 256)
    again = ModelConfig.model_validate(resolved.model_dump())
    assert model_config_for(recipe.model_copy(update={"model": again}), 512, 256) == resolved


def test_dry_run_batch_mismatch_exits_2(capsys, token_manifest):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/gpu_125m_zero1.yaml", "--dry-run", "--world-size", "4",
               "train.grad_accum_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.global_batch_size (512)" in err and "data-parallel size (4) = 256" in err
    # as shipped, the recipe derives its accumulation and runs on 4 GPUs
    assert main(["--config", "configs/pretrain/gpu_125m_zero1.yaml", "--dry-run", "--world-size", "4",
                 f"data.manifests=[{token_manifest}]"]) == 0
    assert '"gradient_accumulation_steps": 8' in capsys.readouterr().out


def test_our_optimizer_extends_one_zero_supports():
    """DeepSpeed checks the exact type and would warn "untested optimizer" on every run;
    build_engine hides that warning only for a subclass of a class ZeRO supports."""
    from training.engine import zero_supported_base

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert zero_supported_base(SkippingAdamW(params)) is torch.optim.AdamW
    assert zero_supported_base(torch.optim.SGD(params, lr=0.1)) is None


def test_fp16_on_cpu_is_refused_before_starting(capsys, tmp_path):
    from launcher.pretrain import main

    rc = main(["--config", "configs/pretrain/cpu_tiny.yaml", f"run_dir={tmp_path}",
               "train.precision=fp16", "train.device=cpu"])
    assert rc == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err


CLAIM = re.compile(r"Model-state memory per GPU \(--dry-run, (\d+) nodes? x (\d+) GPUs?\): ([\d.]+) GiB")


@pytest.mark.parametrize("path", sorted(Path("configs/pretrain").glob("gpu_*.yaml")), ids=lambda p: p.name)
def test_recipe_memory_claims_match_the_dry_run(path):
    from model.config import resolve_model_config
    from model.flops import num_params

    match = CLAIM.search(path.read_text())
    assert match, f"{path}: no 'Model-state memory per GPU (--dry-run, N nodes x G GPUs): X GiB' line"
    nodes, gpus, claimed = int(match.group(1)), int(match.group(2)), float(match.group(3))
    cfg = load_config(PretrainConfig, path)
    model = resolve_model_config(cfg.model)
    from model.pipeline import stage_params
    from model.tensor_parallel import params_per_rank

    train = cfg.train
    rank_params = (params_per_rank(model, train.tensor_parallel) if train.tensor_parallel > 1 else
                   max(stage_params(model, train.pipeline_stages)) if train.pipeline_stages > 1 else None)
    est = estimate_memory_per_gpu(train, num_params(model), model.vocab_size * model.dim, gpus, nodes, rank_params)
    assert est["gpu_gib"] == pytest.approx(claimed, abs=0.006)
    assert cfg.train.planned_world_size == nodes * gpus, "the header's plan is the recipe's train.planned_world_size"


def _readme_recipe_table() -> dict[str, list[str]]:
    lines = Path("README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("| recipe | model | ZeRO |")))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_readme_recipe_table_matches_the_recipe_files():
    """Every pretraining recipe is in the README's table with its own numbers, and nothing else is."""
    from model.config import max_seq_len_is_explicit, resolve_model_config

    table = _readme_recipe_table()
    recipes = sorted(Path("configs/pretrain").glob("*.yaml"))
    assert sorted(table) == sorted(p.name for p in recipes)
    for path in recipes:
        model_cell, zero, precision, batch, planned, memory = table[path.name]
        cfg = load_config(PretrainConfig, path)
        train, where = cfg.train, path.name
        assert model_cell.split()[0] == (cfg.model.preset or "custom"), where
        assert zero.split()[0] == str(train.zero_stage), where
        assert ("offload" in zero) == (train.offload_optimizer != "none"), where
        assert precision == train.precision, where
        world = train.planned_world_size
        sequences = train.global_batch_size or train.micro_batch_size * (train.grad_accum_steps or 1) * world
        count, _, rest = batch.partition(" × ")
        assert int(count) == sequences, where
        if max_seq_len_is_explicit(cfg.model):
            seq = resolve_model_config(cfg.model).max_seq_len
            assert rest.split()[0] == str(seq), where
            assert f"({sequences * seq / 2**20:.2g}M)" in rest, where
        else:
            assert rest.startswith("shards' seq_len"), where
            assert f"({train.micro_batch_size} per rank)" in rest, where
        if train.device == "cpu":
            assert planned == f"{world} CPU rank{'s' if world > 1 else ''}", where
        elif world == 1:
            assert planned.startswith("1 GPU"), where
        else:
            assert planned == f"{world // 8} × 8 GPUs", where
        claim = CLAIM.search(path.read_text())
        if claim:
            assert memory.startswith(f"{claim.group(3)} GiB"), where
        else:
            assert "GiB" not in memory, where


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_language_model_built_on_meta_equals_direct_construction(stage):
    from model.config import ModelConfig, resolve_model_config
    from model.transformer import Transformer
    from training.steps.language_model import build_language_model

    cfg = resolve_model_config(ModelConfig(preset="tiny", tie_embeddings=stage == 1), vocab_size=256)
    built = build_language_model(cfg, {"zero_optimization": {"stage": stage}}, seed=7, device=torch.device("cpu"))
    torch.manual_seed(7)
    direct = Transformer(cfg)
    a, b = built.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 for p in built.parameters())


def test_each_rank_takes_its_gpu_modulo_the_visible_ones(monkeypatch):
    from training.engine import process_group_backend, resolve_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device(TrainConfig(device="cuda"), local_rank=3) == torch.device("cuda", 0)  # Slurm task
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device(TrainConfig(device="auto"), local_rank=3) == torch.device("cuda", 3)
    assert chosen == [0, 3]
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


# ------------------------------------------------------------------ ZeRO settings and AdamW

ZERO_SETTINGS = {"reduce_bucket_size": 123, "allgather_bucket_size": 456, "overlap_comm": False,
                 "contiguous_gradients": False, "stage3_prefetch_bucket_size": 789,
                 "stage3_max_live_parameters": 1011, "stage3_max_reuse_distance": 1213,
                 "stage3_param_persistence_threshold": 1415, "zero_hpz_partition_size": 2}
ZERO_STAGE_KEYS = {0: set(), 1: {"reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients"}}
ZERO_STAGE_KEYS[2] = ZERO_STAGE_KEYS[1]
ZERO_STAGE_KEYS[3] = (ZERO_STAGE_KEYS[1] - {"allgather_bucket_size"}) | {
    k for k in ZERO_SETTINGS if k.startswith("stage3_") or k == "zero_hpz_partition_size"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_settings_land_in_the_deepspeed_json_for_their_stage_only(stage):
    applicable = {k: v for k, v in ZERO_SETTINGS.items() if k in ZERO_STAGE_KEYS[stage]}
    train = TrainConfig(zero_stage=stage, precision="bf16",
                        zero={**applicable, "communication_data_type": "fp32"})
    config = build_deepspeed_config(train, OptimConfig(), 4, ranks_per_node=2)
    zero = config["zero_optimization"]
    for key, value in applicable.items():
        assert zero[key] == value, key
    assert not (set(ZERO_SETTINGS) - ZERO_STAGE_KEYS[stage]) & set(zero)
    assert config["communication_data_type"] == "fp32"  # a top-level DeepSpeed key, every stage


def test_zero_defaults_keep_deepspeed_defaults_and_the_cpu_recipes_json():
    for path in ("configs/pretrain/cpu_tiny.yaml", "configs/pretrain/cpu_demo.yaml"):
        config = build_deepspeed_config(load_config(PretrainConfig, path).train, OptimConfig(), 2)
        assert config["zero_optimization"] == {  # as generated before train.zero existed
            "stage": 2, "contiguous_gradients": True, "overlap_comm": False,
            "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
        assert "communication_data_type" not in config  # DeepSpeed's default: the training precision
    zero3 = build_deepspeed_config(TrainConfig(zero_stage=3, device="cuda"), OptimConfig(), 2)["zero_optimization"]
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ours = DeepSpeedZeroConfig(**zero3)
    theirs = DeepSpeedZeroConfig(stage=3)
    for field in ("reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters", "max_reuse_distance",
                  "param_persistence_threshold", "zero_hpz_partition_size", "overlap_comm", "contiguous_gradients"):
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize("key,value,stage", [
    ("stage3_prefetch_bucket_size", 1, 2), ("zero_hpz_partition_size", 8, 1),
    ("stage3_max_live_parameters", 1, 0), ("allgather_bucket_size", 1, 3), ("reduce_bucket_size", 1, 0)])
def test_a_zero_setting_for_another_stage_exits_2_naming_the_key(key, value, stage, capsys):
    from crucible.cli import stage_main

    rc = stage_main(PretrainConfig, lambda cfg, args: 0, "x", "d",
                    argv=[f"train.zero_stage={stage}", f"train.zero.{key}={value}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"train.zero.{key}={value}" in err and f"(got {stage})" in err


def test_hpz_must_divide_the_world_and_the_node():
    train = TrainConfig(zero_stage=3, zero={"zero_hpz_partition_size": 8})
    assert build_deepspeed_config(train, OptimConfig(), 32, ranks_per_node=8)["zero_optimization"][
        "zero_hpz_partition_size"] == 8
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size=8 must divide the data-parallel size \(12\)"):
        build_deepspeed_config(train, OptimConfig(), 12)
    with pytest.raises(ConfigError, match=r"must divide the ranks per node \(4\)"):
        build_deepspeed_config(train, OptimConfig(), 32, ranks_per_node=4)


def _dry_run_json(out: str) -> dict:
    start = out.index("{", out.index("deepspeed config ("))
    return json.loads(out[start:out.index("\nmodel-state memory")])


@pytest.mark.parametrize("path", sorted(Path("configs/pretrain").glob("gpu_*.yaml")), ids=lambda p: p.name)
def test_every_gpu_recipe_zero_settings_appear_in_its_dry_run(path, capsys, token_manifest):
    from launcher.pretrain import main

    recipe = yaml.safe_load(path.read_text())
    sources = len(recipe["data"]["manifests"])
    assert main(["--config", str(path), "--dry-run", f"data.manifests=[{','.join([str(token_manifest)] * sources)}]"]) == 0
    ds = _dry_run_json(capsys.readouterr().out)
    settings = recipe["train"].get("zero", {})
    assert settings or recipe["train"]["planned_world_size"] == 1, "a multi-GPU recipe sets train.zero"
    for key, value in settings.items():
        assert (ds if key == "communication_data_type" else ds["zero_optimization"])[key] == value, key


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    from training.optim import adamw_kwargs

    assert adamw_kwargs(torch.device("cuda", 3).type, [torch.float32, torch.bfloat16]) == {"fused": True, "foreach": False}
    assert adamw_kwargs("cpu", [torch.float32]) == {"fused": False, "foreach": True}  # exact resume on CPU
    assert adamw_kwargs("cuda", [torch.int64]) == {"fused": False, "foreach": True}
    assert adamw_kwargs("mixed") == {"fused": False, "foreach": True}
    # the choice follows the tensors the optimizer really steps (ZeRO's partitions, on the host
    # when offloaded), made at the first step
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippingAdamW([p], lr=0.1, foreach=False)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["foreach"] is True and opt.param_groups[0]["fused"] is False
