"""``train.compile``: every Transformer block compiled on its own (model/compile.py) trains to
the eager losses under DeepSpeed on 2 gloo CPU ranks; the config key and the GPU recipes.

Tolerance: inductor fuses the blocks' element-wise work and reorders fp32 reductions (RMSNorm,
softmax, gradient sums), so one step differs from eager by float rounding (relative ~1e-6); AdamW
then amplifies those differences a little each step. Over 4 steps of a 2-layer model the losses
agree to about 1e-5 relative; 1e-4 leaves headroom and still fails for any real error (a wrong
block, a missing gradient or a skipped checkpoint recompute moves the loss by 1e-2 or more).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.harness import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
VOCAB = 256


def _model_config(checkpointing: bool):
    from model.config import ModelConfig, resolve_model_config

    return resolve_model_config(ModelConfig(preset="tiny", n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
                                            activation_checkpointing=checkpointing), vocab_size=VOCAB)


def _compile_one_block(tokens) -> None:
    """Forward and backward of a compiled plain model: compiles (or loads) the block's kernels."""
    from model.compile import compile_blocks
    from model.transformer import build_transformer

    model = build_transformer(_model_config(False), seed=0)
    compile_blocks(model)
    model(tokens, targets=tokens, loss_chunk_tokens=16).backward()


def _losses(rank: int, world_size: int, variants: list[tuple[int, bool, bool]]) -> list[list[float]]:
    """Per variant (zero stage, compile, activation checkpointing): this rank's losses over STEPS
    steps of a 2-layer model (dim 64) on fixed random tokens."""
    import torch
    import torch.distributed as dist

    from model.compile import compile_blocks, is_compiled
    from training.config import OptimConfig
    from training.engine import build_engine
    from training.optim import build_optimizer, param_groups
    from training.steps.language_model import build_language_model

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, VOCAB, (2, 33), generator=gen) for _ in range(STEPS)]
    if any(compiled for _, compiled, _ in variants):
        # rank 0 compiles a block first, outside DeepSpeed, so that rank 1 then finds the kernels in
        # inductor's cache instead of compiling the same ones at the same time on the same cores
        for turn in range(world_size):
            if turn == rank:
                _compile_one_block(torch.randint(0, VOCAB, (2, 32), generator=gen))
            dist.barrier()
    out = []
    for stage, compiled, checkpointing in variants:
        cfg = _model_config(checkpointing)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                     "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        model = build_language_model(cfg, ds_config, seed=7, device=torch.device("cpu"))
        if compiled:
            assert compile_blocks(model) == 2 and all(is_compiled(block) for block in model.layers)
        optim = OptimConfig(lr=1e-2)
        groups = param_groups(model, optim)
        engine, _ = build_engine(model, ds_config, build_optimizer(groups, optim, stage))
        losses = []
        for tokens in batches:
            loss = engine(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk_tokens=16)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        engine.eval()
        with torch.no_grad():  # evaluation: another batch size (compiles once more), no grad
            losses.append(engine(batches[0][:1, :-1], targets=batches[0][:1, 1:]).item())
        out.append(losses)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_blocks_train_to_eager_losses_on_two_ranks():
    """ZeRO-2, eager then compiled, in the same 2 rank processes: the 4 training losses and an
    evaluation loss at another batch size (a recompile, no grad) agree. (ZeRO-3 with activation
    checkpointing also agrees, to 2e-7, but its graph breaks at DeepSpeed's parameter hooks
    compile ~60 s more of kernels on 2 cores: checked by hand, see the report of train.compile.)"""
    per_rank = run_on_ranks(_losses, 2, [(2, False, False), (2, True, False)], timeout=600)
    import torch

    for eager, compiled in per_rank:
        assert eager[0] != eager[-2]  # the model trains: the comparison is not of constants
        torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)


def test_compile_key_defaults_off_and_gpu_recipes_turn_it_on():
    from training.config import TrainConfig

    assert TrainConfig().compile is False
    assert TrainConfig(compile=True).compile is True
    recipes = sorted((ROOT / "configs" / "pretrain").glob("gpu_*.yaml"))
    assert recipes
    for recipe in recipes:
        train = yaml.safe_load(recipe.read_text())["train"]
        # compile inside sequence/tensor/pipeline-parallel blocks is not verified yet (refused)
        model_parallel = any(train.get(k, 1) > 1 for k in ("sequence_parallel", "pipeline_stages", "tensor_parallel"))
        assert train.get("compile") is (not model_parallel), f"{recipe.name}: train.compile should be {not model_parallel}"
    for recipe in sorted((ROOT / "configs" / "pretrain").glob("cpu_*.yaml")):
        assert not yaml.safe_load(recipe.read_text())["train"].get("compile", False), recipe.name
