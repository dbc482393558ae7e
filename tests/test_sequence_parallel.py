"""Sequence parallelism (DeepSpeed-Ulysses, ``train.sequence_parallel``) on CPU ranks over gloo.

- Config refusals (in-process): the combinations that were not verified, and the shapes that do
  not split.
- Sequence parallel 2 on 2 ranks (ZeRO-3) follows the shared 1-rank run of tests/model_parallel.py
  (document attention, the same global batch) for 10 steps, with a rank SIGKILLed while saving
  step 10 and the rerun resuming from step 5 and reproducing the losses it had logged before the
  kill bit for bit; a rerun without sequence parallelism is refused.
- Long context (2 in-process gloo ranks, the model only): the tiny model at 8x its length (YaRN), the
  loss and gradients of the split sequence equal the whole sequence's, and each rank keeps about
  half the activation bytes of one rank, printed beside the ``--dry-run`` estimate; one ZeRO-2
  step of the split model with activation checkpointing has the whole sequence's gradient norm.

Tolerance of the 1-rank comparison: the 2 ranks compute the same per-token losses, but attention
runs after an all-to-all on re-laid-out tensors, the loss is summed in two halves and DeepSpeed
sums the two ranks' gradients: fp32 rounding differs at ~1e-7 relative per step. AdamW normalises
the updates and the model is tiny, so over 10 steps losses stay within 1e-5 relative and the
gradient norm within 1e-4 (as tests/test_pretrain_distributed.py; measured below). A wrong factor
(a gradient averaged instead of summed over the sequence ranks, a loss over the local tokens only,
a chunk from the wrong positions) moves both by more than 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from crucible.errors import ConfigError
from tests.harness import run_on_ranks
from tests.model_parallel import RECIPE, STEPS, assert_follows, by_step, launch, records

# ------------------------------------------------------------------------------ refusals

def test_unverified_combinations_and_unsplittable_shapes_are_refused():
    from pydantic import ValidationError

    from training.config import PretrainConfig, TrainConfig
    from training.parallel import check_sequence_parallel, data_parallel_size, parallel_groups

    for bad, reason in [({"compile": True}, "compile"), ({"zero_stage": 2, "offload_optimizer": "cpu"}, "ZeRO-Offload"),
                        ({"zero_stage": 3, "zero": {"zero_hpz_partition_size": 2}}, "hpz_partition_size")]:
        with pytest.raises(ValidationError, match=reason):
            TrainConfig(sequence_parallel=2, **bad)
        TrainConfig(sequence_parallel=1, **bad)  # accepted without sequence parallelism
    with pytest.raises(ValidationError, match="harness.tasks needs train.sequence_parallel=1"):
        PretrainConfig(train={"sequence_parallel": 2}, harness={"tasks": ["lambada"]})
    with pytest.raises(ConfigError, match=r"sequence_parallel=2 must divide the number of ranks \(3\)"):
        data_parallel_size(3, 2)
    with pytest.raises(ConfigError, match=r"sequence length \(63\)"):
        check_sequence_parallel(2, 63, 4, 2)
    with pytest.raises(ConfigError, match=r"n_heads \(4\) and the key/value heads \(2\)"):
        check_sequence_parallel(4, 64, 4, 2)
    check_sequence_parallel(2, 64, 4, 2)
    assert parallel_groups(4, 2) == {"sequence": [[0, 1], [2, 3]], "data": [[0, 2], [1, 3]]}


# ------------------------------------------------------------------- training and resume

@pytest.mark.slow
@pytest.mark.distributed
def test_sequence_parallel_two_ranks_follow_one_rank_and_resume_bit_for_bit(mp_manifest, mp_reference, tmp_path):
    """SP2 under ZeRO-3 (the loss scaled by 2 there) against the shared 1-rank run (ZeRO-1)."""
    sp = ("train.sequence_parallel=2", "train.zero_stage=3")
    run = tmp_path / "sp2"  # rank 1 SIGKILLs itself while saving step 10: the rerun resumes from step 5
    killed = launch(run, mp_manifest, *sp, num_gpus=2, env={"CRUCIBLE_FAULT_KILL_IN_SAVE": str(STEPS)})
    assert killed.returncode != 0
    before = by_step(records(run), "train/loss")
    assert sorted(before) == list(range(1, STEPS + 1)), killed.describe()
    logged = len(records(run))
    launch(run, mp_manifest, *sp, num_gpus=2).check()
    after = by_step(records(run)[logged:], "train/loss")
    assert sorted(after) == list(range(6, STEPS + 1))
    for step in after:  # the rerun repeats what the interrupted run computed, bit for bit
        for key in ("train/loss", "train/grad_norm"):
            assert after[step][key] == before[step][key], f"step {step} {key}"

    assert_follows(run, mp_reference, "SP2")

    # the checkpoints hold sequence-parallel chunks of the data order: another layout is refused
    other = launch(run, mp_manifest, "train.zero_stage=3", "train.max_steps=12", num_gpus=2)
    assert other.returncode != 0
    said = other.stdout + "".join(other.rank_logs.values())
    assert "was saved with train.sequence_parallel=2 and this run sets 1" in said, other.describe()


# ------------------------------------------------------------------------- long context

LONG = 8 * 128  # 8x the tiny preset's pretraining length


def _long_context_cfg():
    from model.config import ModelConfig

    # extended as a context-extension run would be: YaRN over the preset's 128 positions
    return ModelConfig(preset="tiny", vocab_size=256, max_seq_len=LONG, dtype="float32",
                       rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128})


def _saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss and the bytes autograd keeps for backward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk_tokens=256)
    return loss, sum(storages.values())


def _long_context_rank(rank: int, world_size: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    from model.transformer import build_transformer
    from training.engine import use_environment_ninja
    from training.parallel import initialize_sequence_parallel

    use_environment_ninja()
    deepspeed.init_distributed(dist_backend="gloo")
    tokens = torch.randint(0, 256, (1, LONG + 1), generator=torch.Generator().manual_seed(0))
    out: dict = {}
    if rank == 0:  # one rank, the whole sequence
        whole = build_transformer(_long_context_cfg(), seed=0)
        loss, out["whole_bytes"] = _saved_bytes(whole, tokens)
        loss.backward()
        out["whole_loss"] = loss.detach().numpy()  # numpy: pickled by value through the result queue
        out["whole_grads"] = {n: p.grad.numpy() for n, p in whole.named_parameters()}
    _, group = initialize_sequence_parallel(world_size)
    model = build_transformer(_long_context_cfg(), seed=0)
    model.enable_sequence_parallel(group)
    loss, out["bytes"] = _saved_bytes(model, tokens)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    grads = {}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad, group=group)  # DeepSpeed sums the group's gradients the same way
        grads[n] = p.grad.numpy()
    out.update(loss=total.numpy(), grads=grads)
    out["zero2_grad_norm"] = _engine_grad_norm(tokens, 2, world_size)
    return out


def _engine_grad_norm(tokens: torch.Tensor, zero_stage: int, sequence_parallel: int) -> float:
    """The gradient norm DeepSpeed computes for one step of the split model under ``zero_stage``
    with the trainer's groups and loss scale, every block checkpointed."""
    from model.transformer import build_transformer
    from training.engine import build_engine
    from training.parallel import initialize_sequence_parallel
    from training.steps.language_model import sequence_parallel_backward_scale

    mpu, group = initialize_sequence_parallel(sequence_parallel)
    # every block recomputed in backward: the recomputation runs the all-to-all again
    model = build_transformer(_long_context_cfg().model_copy(update={"activation_checkpointing": 1}), seed=0)
    model.enable_sequence_parallel(group)
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, _ = build_engine(model, config, None, model_parameters=list(model.parameters()), mpu=mpu)
    loss = engine(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk_tokens=256)
    engine.backward(loss * sequence_parallel_backward_scale(zero_stage, sequence_parallel))
    engine.step()
    return float(engine.get_global_grad_norm())


@pytest.mark.distributed
def test_long_context_split_over_two_ranks_halves_activation_memory():
    from model.memory import estimate_activation_memory

    ranks = run_on_ranks(_long_context_rank, 2, timeout=180)
    whole = ranks[0]
    # the same sums of the same per-token terms in another order (fp32)
    for r in ranks:
        torch.testing.assert_close(torch.from_numpy(r["loss"]), torch.from_numpy(whole["whole_loss"]),
                                   rtol=1e-5, atol=0)
        for name, grad in r["grads"].items():
            torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(whole["whole_grads"][name]),
                                       rtol=1e-4, atol=1e-7, msg=name)
    whole_norm = float(torch.cat([torch.from_numpy(g).flatten() for g in whole["whole_grads"].values()]).norm())
    for r in ranks:  # ZeRO-2 sums the sequence ranks' gradients: the whole sequence's gradient
        assert r["zero2_grad_norm"] == pytest.approx(whole_norm, rel=1e-5)
    cfg = _long_context_cfg()
    estimate = {sp: estimate_activation_memory(cfg, 1, LONG, 4, 256, 0, device="cpu", sequence_parallel=sp)
                for sp in (1, 2)}
    kept = {sp: e.blocks_bytes + e.final_norm_bytes for sp, e in estimate.items()}
    ratios = [r["bytes"] / whole["whole_bytes"] for r in ranks]
    print(f"saved for backward at {LONG} tokens: 1 rank {whole['whole_bytes'] / 2**20:.2f} MiB, "
          f"sequence parallel 2: {[round(r['bytes'] / 2**20, 2) for r in ranks]} MiB per rank "
          f"(ratio {[round(x, 3) for x in ratios]}); --dry-run estimate (blocks + final norm) "
          f"{kept[1] / 2**20:.2f} -> {kept[2] / 2**20:.2f} MiB (ratio {kept[2] / kept[1]:.3f}), peak "
          f"{estimate[1].peak_bytes / 2**20:.2f} -> {estimate[2].peak_bytes / 2**20:.2f} MiB")
    for ratio in ratios:
        assert 0.45 < ratio < 0.6, ratios
    assert kept[2] / kept[1] == pytest.approx(0.5)


def test_dry_run_prints_the_groups_and_activations_per_rank(mp_manifest, capsys):
    """The groups for --world-size ranks, the data-parallel size, activations per rank; heads that
    do not split are refused before any plan is printed (exit 2)."""
    from launcher.pretrain import main

    common = ["--config", RECIPE, "--dry-run", "--world-size", "4", f"data.manifests=[{mp_manifest}]"]
    assert main([*common, "train.sequence_parallel=2", "train.grad_accum_steps=null"]) == 0
    out = capsys.readouterr().out
    assert "sequence-parallel groups (2 of 2 rank(s)): [0, 1], [2, 3]" in out
    assert "data-parallel groups (2 of 2 rank(s)): [0, 2], [1, 3]" in out
    assert "data-parallel size 2 = 4 ranks / sequence_parallel 2" in out
    assert "sequence split over 2 ranks, 32 tokens per rank, attention over all tokens for 2 heads" in out
    assert main([*common, "train.sequence_parallel=4"]) == 2
    captured = capsys.readouterr()
    assert "must divide both model.n_heads (4) and the key/value heads (2)" in captured.err
    assert "deepspeed config" not in captured.out
