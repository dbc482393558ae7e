"""Streaming consolidation of DeepSpeed checkpoints into model directories.

One 2-rank job (gloo, CPU) saves a trained step of a tiny model under ZeRO 0, 1, 2, 3 (fp32) and
DeepSpeed's BF16_Optimizer (bf16, ZeRO 1), plus a 48-layer model, together with the full fp32
weights each engine held (the reference where ``zero_to_fp32`` cannot read the files).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.harness import run_on_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TINY = {"preset": "tiny"}
TINY_TIED = {"preset": "tiny", "tie_embeddings": True}
# 48 layers of width 64 over a small vocabulary: the model (~10 MB) is ~200 times its largest
# tensor (48 KB), so holding it whole cannot pass for streaming
DEEP = {"vocab_size": 256, "dim": 64, "n_layers": 48, "n_heads": 4, "ffn_dim": 192, "max_seq_len": 32}
CASES = {  # name: (ZeRO stage, bf16, model config)
    "zero0": (0, False, TINY_TIED),
    "zero1": (1, False, TINY_TIED),
    "zero2": (2, False, TINY),
    "zero3": (3, False, TINY),
    "bf16_zero1": (1, True, TINY),
    "deep_zero2": (2, False, DEEP),
}
TAG = "step_00000001"


def _save_all(rank: int, world_size: int, root: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import save_file

    from model.config import ModelConfig
    from model.io import save_model_dir
    from model.transformer import build_transformer
    from training import checkpoint as ckpt

    for name, (stage, bf16, model) in CASES.items():
        cfg = ModelConfig(**model)
        net = build_transformer(cfg, seed=0)
        decay = [p for n, p in net.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        if bf16:
            ds.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
        engine, _, _, _ = deepspeed.initialize(  # two groups: two flat buffers per rank
            model=net, config=ds, model_parameters=[{"params": decay, "weight_decay": 0.1},
                                                    {"params": no_decay, "weight_decay": 0.0}])
        tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(rank))
        loss = engine(tokens, targets=tokens)
        engine.backward(loss)
        engine.step()  # the fp32 masters move away from the bf16 / initial weights
        run = Path(root) / name
        engine.save_checkpoint(str(run / "checkpoints"), tag=TAG, save_latest=False)
        full = {}
        for pname, param in engine.module.named_parameters():
            value = safe_get_full_fp32_param(param)  # a collective under ZeRO 3
            full[pname] = (param.detach() if value is None else value).float().clone()
        torch.distributed.barrier()
        if rank == 0:
            save_file(full, str(run / "reference.safetensors"))
            path = run / "checkpoints" / TAG
            save_model_dir(path / ckpt.MODEL_FILES, None, cfg, provenance={"test": name})
            ckpt.mark_complete(path, {"step": 1, "world_size": world_size, "zero_stage": stage})
        torch.distributed.barrier()
        del engine, net


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("consolidate")
    run_on_ranks(_save_all, 2, str(root), timeout=600)
    return root


def _reference(saved: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(saved / name / "reference.safetensors"))


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_streaming_equals_deepspeeds_zero_to_fp32(saved, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.zero_checkpoint import iter_fp32_weights

    ckpt_dir = saved / name / "checkpoints" / TAG
    ours = dict(iter_fp32_weights(ckpt_dir))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=TAG)
    if CASES[name][2].get("tie_embeddings"):  # DeepSpeed repeats the tied head; we store it once
        torch.testing.assert_close(theirs.pop("lm_head.weight"), theirs["embed.weight"], rtol=0, atol=0)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)  # a copy of the same bytes
    # and both are the engine's own fp32 masters (not the initial weights)
    reference = _reference(saved, name)
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bf16_zero1", "zero0"])
def test_streaming_equals_the_engines_fp32_weights(saved, name):
    from model.zero_checkpoint import iter_fp32_weights

    ours = dict(iter_fp32_weights(saved / name / "checkpoints" / TAG))
    reference = _reference(saved, name)
    if CASES[name][2].get("tie_embeddings"):
        reference.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    if name == "bf16_zero1":  # the fp32 masters, not the module's bf16 copy
        assert any(not torch.equal(v, v.bfloat16().float()) for v in ours.values())


def test_consolidation_peak_memory_is_one_shard_plus_one_tensor(saved, tmp_path):
    """Every CPU allocation during consolidation (torch profiler memory events, reads included)
    stays below the largest tensor + one output shard + 64 KB (the safetensors read of the head
    and small temporaries), while the model is ~10 MB."""
    from torch.profiler import ProfilerActivity, profile

    from model.io import consolidate_checkpoint, load_weights, weight_files

    ckpt_dir = saved / "deep_zero2" / "checkpoints" / TAG
    shard = 512 * 1024
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = consolidate_checkpoint(ckpt_dir, tmp_path / "model", max_shard_bytes=shard)
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    reference = _reference(saved, "deep_zero2")
    model_bytes = sum(t.nbytes for t in reference.values())
    largest = max(t.nbytes for t in reference.values())
    bound = largest + shard + 64 * 1024
    assert model_bytes > 10 * bound  # a consolidation holding the model could not pass
    assert peak <= bound, f"peak {peak} B > bound {bound} B (model {model_bytes} B)"
    assert peak >= shard - largest  # the tracker saw the shard being filled
    files = weight_files(out)
    assert len(files) >= model_bytes // shard and all(f.stat().st_size <= shard + 4096 for f in files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == model_bytes
    state = load_weights(out)
    assert sorted(state) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_run_dir_consolidates_on_demand_and_loads_for_generate_and_export(saved, tmp_path):
    from launcher.consolidate import main as consolidate_main
    from model.convert import export_hf
    from model.io import find_model_dir, load_model_dir, read_hf_dir

    run = saved / "zero3"
    ckpt_dir = run / "checkpoints" / TAG
    assert not (ckpt_dir / "model").exists()
    model, _ = load_model_dir(run)  # what generate does with a run directory
    assert (ckpt_dir / "model" / "COMPLETE.json").is_file()
    assert find_model_dir(run) == ckpt_dir / "model" == find_model_dir(ckpt_dir)
    reference = _reference(saved, "zero3")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    from training.checkpoint import checkpoint_problem

    assert checkpoint_problem(ckpt_dir) is None  # the checkpoint's own inventory is still valid
    _, hf_state = read_hf_dir(export_hf(find_model_dir(run), tmp_path / "hf"))
    for key, value in hf_state.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    # the command, sharded, elsewhere
    assert consolidate_main([str(run), "--step", "1", "--out", str(tmp_path / "m"), "--max-shard-size", "1MB"]) == 0
    assert len(list((tmp_path / "m").glob("model-*-of-*.safetensors"))) > 2
    sharded, _ = load_model_dir(tmp_path / "m")
    for key, value in sharded.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_an_unwritable_checkpoint_names_the_command(saved, monkeypatch):
    import model.io
    from crucible.errors import DataError
    from model.io import find_model_dir

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model.io, "consolidate_checkpoint", read_only)
    ckpt_dir = saved / "zero2" / "checkpoints" / TAG
    with pytest.raises(DataError, match=r"cannot be written there \(Permission denied\); run "
                                        r"`python launcher/consolidate.py .*step_00000001 --out <dir>`"):
        find_model_dir(ckpt_dir)
