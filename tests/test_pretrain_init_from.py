"""Pretraining from existing weights (``init_from``): a Hugging Face Llama directory loaded under
ZeRO-3 gives the source's logits, a run continued from another run's checkpoint starts from its
weights with fresh optimizer state and schedule, the run's own checkpoint wins on resume, and
architecture or tokenizer mismatches are refused naming what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.datasets import shared_token_dataset
from tests.harness import ROOT, run_on_ranks

VOCAB = 512  # the shared test tokenizer's
RECIPE = str(ROOT / "configs" / "pretrain" / "cpu_continue.yaml")  # run here, shrunk, on 1 rank


@pytest.fixture(scope="session")
def token_manifest(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory)


def _overrides(run_dir: Path | str, manifest: Path | str, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.manifests=[{manifest}]", "train.micro_batch_size=2",
            "train.grad_accum_steps=1", "train.device=cpu", "train.precision=fp32", "train.eval_every=0",
            "train.eval_full_at_end=false", "log.tensorboard=false", "log.rank_files=false",
            "log.peak_tflops=1", "optim.weight_decay=0", "schedule.kind=constant", *extra]


def _trainer(rank: int, world_size: int, overrides: list[str], callbacks=(), recipe: str | None = None,
             **kw: Any):
    from crucible.config import load_config
    from training.config import PretrainConfig
    from training.engine import init_distributed
    from training.steps.language_model import LanguageModelStep
    from training.trainer import Trainer

    cfg = load_config(PretrainConfig, recipe, overrides)
    ctx = init_distributed(cfg.train)  # joins the harness's gloo group; DeepSpeed's view of it too
    assert (ctx.rank, ctx.world_size) == (rank, world_size)
    return Trainer(cfg, ctx, LanguageModelStep(cfg, ctx), list(callbacks), **kw)


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------- a Hugging Face directory under ZeRO-3

@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, token_manifest) -> Path:
    """A Hugging Face ``LlamaForCausalLM`` saved by transformers itself (GQA, untied head, a
    large init so that logits differ clearly), with the shards' sentencepiece tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("hf_llama")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(5)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok = token_manifest.parent.parent / "tokenizer"
    for name in ("tokenizer.model", "tokenizer.json"):
        if (tok / name).is_file():
            shutil.copyfile(tok / name, out / name)
    return out


def _zero3_start(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    trainer = _trainer(rank, world_size, overrides, checkpoints=False, evaluate=False)
    params = list(trainer.engine.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)  # this rank's partitions
    total = sum(p.ds_numel for p in params)
    trainer.engine.eval()
    with torch.no_grad():
        before = trainer.engine(_tokens()).float()
    trainer.engine.train()
    status = trainer.run()  # one step at lr 1e-9: the optimizer's fp32 partitions hold the source too
    trainer.engine.eval()
    with torch.no_grad():
        after = trainer.engine(_tokens()).float()
    trainer.preempt.uninstall()
    # numpy, not tensors: torch's queue shares tensors through memory the exiting rank releases
    return {"local": local, "total": total, "before": before.numpy(), "after": after.numpy(),
            "status": status, "step": trainer.state.step}


@pytest.mark.distributed
def test_hf_llama_dir_under_zero3_gives_the_source_logits(hf_llama_dir, token_manifest, tmp_path):
    from transformers import LlamaForCausalLM

    from crucible.fileio import sha256_file

    run = tmp_path / "run"
    overrides = _overrides(run, token_manifest, f"init_from={hf_llama_dir}", "train.zero_stage=3",
                           "train.max_steps=1", "optim.lr=1e-9")
    per_rank = run_on_ranks(_zero3_start, 2, overrides, timeout=300)
    hf = LlamaForCausalLM.from_pretrained(hf_llama_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = hf(_tokens()).logits.float()
    for r in per_rank:
        assert r["status"] == 0 and r["step"] == 1
        # each rank holds about half of the parameters (each tensor padded to a multiple of 2)
        assert r["local"] <= r["total"] // 2 + 64
        # fp32 on both sides, same math in another order (sdpa, RMSNorm, RoPE): ~1e-6 apart
        torch.testing.assert_close(torch.from_numpy(r["before"]), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(r["after"]), expected, rtol=1e-5, atol=1e-5)
    assert sum(r["local"] for r in per_rank) >= per_rank[0]["total"]
    record = json.loads((run / "init_from.json").read_text())
    assert record["init_from"] == str(hf_llama_dir) and record["kind"] == "Hugging Face Llama directory"
    assert record["weights_sha256"] == {"model.safetensors": sha256_file(hf_llama_dir / "model.safetensors")}
    assert record["step"] is None


# ------------------------------------------------------------- from another run's checkpoint

def _weights(engine) -> dict[str, Any]:
    return {n: p.detach().numpy().copy() for n, p in engine.module.named_parameters()}


def _adam_steps(optimizer) -> list[int]:
    basic = getattr(optimizer, "optimizer", optimizer)  # inside ZeRO's wrapper
    return [int(s["step"]) for s in basic.state.values()]


def _continue_runs(rank: int, world_size: int, first: str, second: str, manifest: str) -> dict[str, Any]:
    from training.callbacks.base import Callback

    class LRs(Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def post_step(self, trainer, metrics):
            self.lrs.append(metrics["train/lr"])

    out: dict[str, Any] = {}
    common = ["optim.lr=0.01", "schedule.kind=linear", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.5"]
    # the source: two steps from random weights, its model directory consolidated at the end
    lrs = LRs()
    source = _trainer(rank, world_size, _overrides(first, manifest, "model.preset=tiny",
                                                   "train.max_steps=2", *common), [lrs])
    source.run()
    source.preempt.uninstall()
    out["source_lrs"], out["source_adam_steps"] = lrs.lrs, _adam_steps(source.optimizer)
    # continued from the source run with the shipped recipe: its weights, nothing else
    lrs = LRs()
    cont = _trainer(rank, world_size, _overrides(second, manifest, f"init_from={first}",
                                                 "train.max_steps=1", *common), [lrs], recipe=RECIPE)
    out["start_weights"] = _weights(cont.engine)
    out["start_adam_steps"], out["start_step"] = _adam_steps(cont.optimizer), cont.state.step
    out["start_resumed"] = cont.resume_from is not None
    cont.run()
    cont.preempt.uninstall()
    out["cont_lrs"], out["cont_adam_steps"] = lrs.lrs, _adam_steps(cont.optimizer)
    # the same command again with more steps: the run's own checkpoint, not init_from
    again = _trainer(rank, world_size, _overrides(second, manifest, f"init_from={first}",
                                                  "train.max_steps=2", *common), recipe=RECIPE)
    out["resumed_from"] = str(again.resume_from.path) if again.resume_from is not None else None
    out["resumed_step"], out["resumed_weights"] = again.state.step, _weights(again.engine)
    out["resumed_adam_steps"] = _adam_steps(again.optimizer)
    again.preempt.uninstall()
    return out


@pytest.mark.distributed
def test_continued_run_starts_from_the_checkpoint_with_fresh_optimizer_and_resumes_its_own(
        token_manifest, tmp_path):
    from model.io import load_weights

    first, second = tmp_path / "first", tmp_path / "second"
    (r,) = run_on_ranks(_continue_runs, 1, str(first), str(second), str(token_manifest), timeout=300)
    source = load_weights(first / "checkpoints" / "step_00000002" / "model")
    assert set(r["start_weights"]) == set(source)
    for name, array in r["start_weights"].items():  # copied, not recomputed: bit-identical
        torch.testing.assert_close(torch.from_numpy(array), source[name], rtol=0, atol=0)
    # fresh optimizer and schedule: no Adam state before the first step, one step after it
    assert r["source_adam_steps"] and set(r["source_adam_steps"]) == {2}
    assert r["start_adam_steps"] == [] and r["start_step"] == 0 and not r["start_resumed"]
    assert set(r["cont_adam_steps"]) == {1}
    assert r["cont_lrs"] == r["source_lrs"][:1]  # the warmup's first step again
    record = json.loads((second / "init_from.json").read_text())
    assert record["step"] == 2 and record["kind"] == "model directory"
    assert record["model_dir"] == str(first / "checkpoints" / "step_00000002" / "model")
    state = json.loads((second / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    assert state["init_from"] == record
    # the second start resumes the run's own checkpoint (step 1, its weights and Adam state)
    assert r["resumed_from"] == str(second / "checkpoints" / "step_00000001")
    assert r["resumed_step"] == 1 and set(r["resumed_adam_steps"]) == {1}
    own = load_weights(second / "checkpoints" / "step_00000001" / "model")
    for name, array in r["resumed_weights"].items():
        torch.testing.assert_close(torch.from_numpy(array), own[name], rtol=0, atol=0)
    assert any(not torch.equal(own[n], source[n]) for n in own)  # the step moved them: not the source
    assert json.loads((second / "init_from.json").read_text()) == record


# ------------------------------------------------------------------------------- refusals

def _prepare(overrides: list[str]) -> None:
    from crucible.config import load_config
    from training.config import PretrainConfig
    from training.deepspeed_config import resolve_batch
    from training.engine import DistContext
    from training.steps.language_model import LanguageModelStep

    cfg = load_config(PretrainConfig, None, overrides)
    LanguageModelStep(cfg, DistContext(0, 1, 0, torch.device("cpu"))).prepare(resolve_batch(cfg.train, 1))


def test_architecture_mismatch_is_refused_naming_each_field(tiny_model_dir, token_manifest, tmp_path):
    from crucible.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _prepare(_overrides(tmp_path, token_manifest, f"init_from={tiny_model_dir}",
                            "model.preset=cpu-small", "model.norm_eps=1e-6"))
    message = str(err.value)
    assert f"init_from={tiny_model_dir} (model directory {tiny_model_dir})" in message
    for field in ("model.dim: recipe 256, init_from 64", "model.n_layers: recipe 6, init_from 2",
                  "model.n_heads: recipe 8, init_from 4", "model.n_kv_heads: recipe 4, init_from 2",
                  "model.ffn_dim: recipe 704, init_from 192", "model.norm_eps: recipe 1e-06, init_from 1e-05"):
        assert field in message
    assert "tie_embeddings" not in message and "max_seq_len" not in message  # unset / not architecture


def test_matching_keys_and_training_keys_are_accepted(tiny_model_dir, token_manifest, tmp_path):
    from crucible.config import load_config
    from training.config import PretrainConfig
    from training.deepspeed_config import resolve_batch
    from training.engine import DistContext
    from training.steps.language_model import LanguageModelStep

    cfg = load_config(PretrainConfig, None, _overrides(
        tmp_path, token_manifest, f"init_from={tiny_model_dir}", "model.dim=64", "model.n_kv_heads=2",
        "model.activation_checkpointing=true", "model.max_seq_len=96", "model.rope_theta=500000"))
    step = LanguageModelStep(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    step.prepare(resolve_batch(cfg.train, 1))
    source = json.loads((tiny_model_dir / "model_config.json").read_text())
    got = step.model_cfg.model_dump(mode="json")
    # training keys and the rotary base (context extension) come from the recipe
    assert got["activation_checkpointing"] is True and got["max_seq_len"] == 96 and got["rope_theta"] == 500000
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "tie_embeddings")
    assert {k: got[k] for k in shape} == {k: source[k] for k in shape}


def test_shards_of_another_tokenizer_are_refused_naming_both(tiny_model_dir, token_manifest, tmp_path):
    from crucible.errors import DataError

    other = tmp_path / "other_tokenizer_model"
    shutil.copytree(tiny_model_dir, other)
    with open(other / "tokenizer.model", "ab") as f:  # another tokenizer file: another sha256
        f.write(b"\0")
    with pytest.raises(DataError) as err:
        _prepare(_overrides(tmp_path / "run", token_manifest, f"init_from={other}"))
    message = str(err.value)
    assert str(token_manifest) in message and str(other / "tokenizer.model") in message
    assert "rebuild the token shards with the model's tokenizer" in message


def test_hf_dir_without_tokenizer_model_is_checked_by_vocabulary(hf_llama_dir, token_manifest, tmp_path):
    from crucible.errors import DataError

    bare = tmp_path / "hf_bare"
    shutil.copytree(hf_llama_dir, bare)
    (bare / "tokenizer.model").unlink()
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB * 2}))
    with pytest.raises(DataError, match=f"vocabulary of {VOCAB} tokens but init_from's model {bare} "
                                        f"has {VOCAB * 2}"):
        _prepare(_overrides(tmp_path / "run", token_manifest, f"init_from={bare}"))
