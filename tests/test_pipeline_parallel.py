"""Pipeline parallelism (``train.pipeline_stages``, DeepSpeed's PipelineModule) on CPU ranks over gloo.

- In-process: the pipeline layers start from exactly the weights ``build_transformer`` gives for the
  seed, whichever stage holds which layer (tied and untied heads), and their names map back to
  the Transformer's; the refused combinations name their reason.
- Pipeline 2 on 2 ranks follows the 1-rank run of tests/model_parallel.py (same global batch, 10
  steps); a rank SIGKILLed while saving step 10 and the rerun from step 5 reproduce the logged
  losses bit for bit; the model directory written at the end equals the 1-rank run's.
- Pipeline 2 x data 2 on 4 ranks, tied embeddings, follows its 1-rank run.

Tolerance: the pipeline computes the same per-token losses and gradients as the 1-rank run (its
first stage's activations are sent, not recomputed), DeepSpeed sums the tied embedding's two
gradients and averages over data-parallel ranks: fp32 rounding differs at ~1e-7 relative per step
(measured: losses within 4e-8, gradient norms equal, on 2 ranks). Over 10 AdamW steps on the tiny
model that stays below 1e-5 relative for losses and 1e-4 for the gradient norm, as in
tests/test_pretrain_distributed.py; a missing gradient (a stage not stepped, a tied gradient not
summed) or a wrong loss scale moves them by more than 1e-2.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.model_parallel import STEPS, assert_follows, by_step, launch, records


def test_pipeline_layers_start_from_the_transformers_weights_on_any_stage_split():
    from model.config import ModelConfig
    from model.pipeline import (
        BlockPipe,
        EmbedPipe,
        HeadPipe,
        NormPipe,
        init_pipeline_weights,
        model_name,
    )
    from model.transformer import build_transformer

    for tied in (True, False):
        cfg = ModelConfig(preset="tiny", vocab_size=300, tie_embeddings=tied, dtype="float32")
        want = build_transformer(cfg, seed=7).state_dict()
        n = cfg.n_layers
        layers = {0: EmbedPipe(cfg), **{i: BlockPipe(cfg) for i in range(1, n + 1)}, n + 1: NormPipe(cfg),
                  n + 2: EmbedPipe(cfg) if tied else HeadPipe(cfg)}
        for cut in range(1, n + 3):  # stage 0 holds layers [0, cut), stage 1 the rest
            for stage in ({i: m for i, m in layers.items() if i < cut}, {i: m for i, m in layers.items() if i >= cut}):
                for module in stage.values():  # what construction drew is replaced
                    torch.nn.init.zeros_(next(module.parameters()))
                init_pipeline_weights(cfg, 7, stage)
            seen = set()
            for index, module in layers.items():
                for name, param in module.named_parameters():
                    path = f"tied_modules.embed.{name}" if tied and index in (0, n + 2) else f"{index}.{name}"
                    seen.add(model_name(path, cfg))
                    torch.testing.assert_close(param, want[model_name(path, cfg)], rtol=0, atol=0)
            assert seen == {k for k in want if not (tied and k == "lm_head.weight")}


def _stage_weights_from_init_source(rank: int, world_size: int, model_dir: str) -> dict[str, bool]:
    import deepspeed

    from model.io import load_weights, read_model_config
    from model.pipeline import build_pipeline_module, model_parameters
    from training.init_model import find_init_source, load_init_weights

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = read_model_config(model_dir)
    pipe = build_pipeline_module(cfg, world_size, 1, seed=3, loss_chunk_tokens=None)  # other weights than the source's
    load_init_weights(pipe, find_init_source(model_dir), False, rank, model_parameters(pipe, cfg))
    want = load_weights(model_dir)
    return {name: torch.equal(param, want[name]) for name, param in model_parameters(pipe, cfg).items()}


@pytest.mark.distributed
def test_init_from_fills_each_stage_with_its_layers_of_the_source(tmp_path, mp_manifest):
    """``init_from`` with a pipeline: each stage loads its own layers by their model names (the
    tied embedding on the first and the last stage), on 2 gloo ranks."""
    from model.config import ModelConfig
    from model.io import save_model_dir
    from model.transformer import build_transformer
    from tests.harness import run_on_ranks

    cfg = ModelConfig(preset="tiny", vocab_size=300, tie_embeddings=True, dtype="float32")
    source = save_model_dir(tmp_path / "source", build_transformer(cfg, seed=11).state_dict(), cfg,
                            tokenizer_dir=mp_manifest.parent.parent / "tokenizer")
    first, last = run_on_ranks(_stage_weights_from_init_source, 2, str(source), timeout=300)
    assert all(first.values()) and all(last.values()), (first, last)
    assert {"embed.weight", "layers.0.attn.wq.weight"} <= set(first) and "norm.weight" not in first
    assert {"embed.weight", "layers.1.mlp.w_down.weight", "norm.weight"} <= set(last)
    assert set(first) | set(last) == {k for k in build_transformer(cfg).state_dict() if k != "lm_head.weight"}


def test_refused_pipeline_combinations_name_the_reason():
    from pydantic import ValidationError

    from training.config import TrainConfig

    for bad, reason in [({"zero_stage": 2}, "DeepSpeed's pipeline engine refuses ZeRO-2"),
                        ({"zero_stage": 0}, "clips by the gradient norm of this rank.s own layers"),
                        ({"sequence_parallel": 2}, "no two of them compose"),
                        ({"tensor_parallel": 2}, "no two of them compose"),
                        ({"compile": True}, "compile")]:
        with pytest.raises(ValidationError, match=reason):
            TrainConfig(pipeline_stages=2, **bad)
    from crucible.errors import ConfigError
    from training.parallel import check_model_parallel

    with pytest.raises(ConfigError, match="at least one block per stage"):
        check_model_parallel(TrainConfig(pipeline_stages=4), n_layers=2, n_heads=4, kv_heads=2, hidden_dim=64)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_two_stages_follow_one_rank_resume_bit_for_bit_and_export(mp_manifest, mp_reference, tmp_path):
    from model.io import find_model_dir, load_weights

    run = tmp_path / "pp2"  # rank 1 (the last stage) SIGKILLs itself while saving step 10
    killed = launch(run, mp_manifest, "train.pipeline_stages=2", num_gpus=2, env={"CRUCIBLE_FAULT_KILL_IN_SAVE": "10"})
    assert killed.returncode != 0
    before = by_step(records(run), "train/loss")
    assert sorted(before) == list(range(1, STEPS + 1)), killed.describe()
    logged = len(records(run))
    launch(run, mp_manifest, "train.pipeline_stages=2", num_gpus=2).check()  # resumes from step 5
    after = by_step(records(run)[logged:], "train/loss")
    assert sorted(after) == list(range(6, STEPS + 1))
    for step in after:  # the rerun repeats what the interrupted run computed, bit for bit
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert after[step][key] == before[step][key], f"step {step} {key}"
    assert_follows(run, mp_reference, "pipeline 2")

    # the model directory made from the pipeline's checkpoint (one optimizer shard per stage)
    got, want = load_weights(find_model_dir(run)), load_weights(find_model_dir(mp_reference))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_two_stages_by_two_data_parallel_on_four_ranks_with_tied_embeddings(mp_manifest, tmp_path):
    """Both runs get a NaN loss in step 4 (rank 0's forward, 0-based step 3): the non-finite
    policy skips that step on every stage and data-parallel rank alike, as on one rank."""
    tied = ("model.tie_embeddings=true", "checkpoint.every=0", "checkpoint.write_model_dir=never")
    nan = {"CRUCIBLE_FAULT_NAN_STEPS": "3"}
    reference = tmp_path / "single-tied"
    launch(reference, mp_manifest, *tied, num_gpus=1, env=nan).check()
    run = tmp_path / "pp2dp2"
    result = launch(run, mp_manifest, *tied, "train.pipeline_stages=2", num_gpus=4, timeout=400, env=nan)
    result.check()
    said = "".join(result.rank_logs.values()) + result.stdout
    assert "global batch 8 (4 x 1 x 2)" in said, said[-3000:]  # micro x accumulation x data-parallel
    for recs in (records(run), records(reference)):
        skipped = by_step(recs, "train/skipped_steps")
        assert [skipped[s]["train/skipped_steps"] for s in (3, 4, 10)] == [0.0, 1.0, 1.0]
    assert_follows(run, reference, "pipeline 2 x data 2, tied, one skipped step")


def test_dry_run_prints_the_pipeline_groups_stages_and_save_bytes(mp_manifest, capsys):
    from launcher.pretrain import main

    args = ["--config", "configs/pretrain/cpu_tiny.yaml", "--dry-run", "--world-size", "4", f"data.manifests=[{mp_manifest}]",
            "train.pipeline_stages=2", "train.zero_stage=1", "train.micro_batch_size=4", "train.grad_accum_steps=null",
            "train.global_batch_size=16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pipeline-parallel groups (2 of 2 rank(s)) (stage 0 first): [0, 2], [1, 3]" in out
    assert "data-parallel groups (2 of 2 rank(s)): [0, 1], [2, 3]" in out
    assert "data-parallel size 2 = 4 ranks / pipeline_stages 2" in out
    assert "pipeline of 2 stages (layers 0-1, 2-4; up to 2 micro batches in flight)" in out
    # the tiny model's stages hold 82,048 and 82,112 parameters (embedding + block, block + norm + head)
    assert "pipeline of 2 stages: 0.1M parameters on the largest stage" in out
    assert "rank 0:     0.00 GiB (820,480 bytes)" in out  # 82,048 x (12 / 2 data-parallel ranks + 4 fp32)
    assert "each other model-parallel part's writer (1 rank(s)):     0.00 GiB (821,120 bytes)" in out


def test_universal_conversion_of_a_model_parallel_checkpoint_is_refused(tmp_path):
    from crucible.errors import UserError
    from training.checkpoint import STATE_FILE, convert_to_universal

    for key in ("pipeline_stages", "tensor_parallel"):
        ckpt = tmp_path / key / "step_00000010"
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_text(json.dumps({"step": 10, key: 2}))
        with pytest.raises(UserError, match=f"train.{key}=2: its universal conversion is not supported"):
            convert_to_universal(ckpt)
