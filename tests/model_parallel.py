"""Shared by the pipeline- and tensor-parallel tests: one token dataset, one launch recipe and
one 1-rank reference run (session fixtures in tests/conftest.py), so each layout is compared with
the same 10 steps and the reference is paid once.

The recipe: the tiny preset (2 blocks, 4 heads, 2 key/value heads) with document attention
(packed documents do not see each other: the document ids cross pipeline stages, split with the
heads under sequence and tensor parallelism), ZeRO-1, global batch 8
(micro batch 4 x 2 accumulation steps on one data-parallel rank), 10 steps, a checkpoint every 5,
validation at steps 5 and 10, logged every step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.harness import ROOT, LaunchResult, run_deepspeed

LAUNCHER = ROOT / "launcher" / "pretrain.py"
RECIPE = "configs/pretrain/cpu_tiny.yaml"
STEPS = 10
GLOBAL_BATCH = 8


def launch(run_dir: Path, manifest: Path, *overrides: str, num_gpus: int = 1,
           env: dict[str, str] | None = None, timeout: float = 300) -> LaunchResult:
    """``deepspeed --num_gpus N launcher/pretrain.py`` with the shared recipe and ``overrides``."""
    args = ["--config", RECIPE, f"run_dir={run_dir}", f"data.manifests=[{manifest}]", f"train.max_steps={STEPS}",
            "train.micro_batch_size=4", "train.grad_accum_steps=null", f"train.global_batch_size={GLOBAL_BATCH}",
            "train.zero_stage=1", "model.attention=document", "schedule.warmup_steps=2", "checkpoint.every=5", "checkpoint.keep_last=3",
            "checkpoint.write_model_dir=end", "log.every=1", "train.eval_every=5", "train.eval_batches=1",
            "train.eval_full_at_end=false", *overrides]
    return run_deepspeed(LAUNCHER, args, num_gpus=num_gpus, timeout=timeout, env=env,
                         log_dir=run_dir.parent / f"{run_dir.name}-launch-logs")


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def by_step(recs: list[dict], key: str) -> dict[int, dict]:
    return {rec["step"]: rec for rec in recs if key in rec}


def worst_relative(got: dict[int, dict], want: dict[int, dict], keys: tuple[str, ...] = ("train/loss", "train/grad_norm")
                   ) -> dict[str, float]:
    """The largest relative difference of each key over the steps both runs logged; a value that
    is not finite (a step skipped by the non-finite policy) must be so in both runs."""
    worst = dict.fromkeys(keys, 0.0)
    for step in sorted(set(got) & set(want)):
        for key in keys:
            a, b = got[step][key], want[step][key]
            if not (math.isfinite(a) and math.isfinite(b)):
                assert not math.isfinite(a) and not math.isfinite(b), f"step {step} {key}: {a} vs {b}"
                continue
            worst[key] = max(worst[key], abs(a / b - 1))
    return worst


def final_state(run: Path) -> dict:
    """The trainer state of the run's newest checkpoint."""
    latest = json.loads((run / "latest.json").read_text())
    return json.loads((run / latest["checkpoint"] / "trainer_state.json").read_text())


def assert_follows(run: Path, reference: Path, label: str) -> dict[str, float]:
    """``run`` (a model-parallel layout) logged the same 10 steps as ``reference`` (1 rank, the same
    recipe and global batch): samples and tokens counted once, losses within 1e-5 and gradient norms
    within 1e-4 relative (see the test modules for why), validation loss and bits per byte at steps
    5 and 10 within 1e-5. Returns the largest relative differences (printed with ``label``)."""
    import pytest

    got, want = by_step(records(run), "train/loss"), by_step(records(reference), "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step]["consumed_samples"] == want[step]["consumed_samples"] == GLOBAL_BATCH * step
    assert final_state(run)["consumed_tokens"] == final_state(reference)["consumed_tokens"]
    worst = worst_relative(got, want)
    print(f"{label} vs 1 rank over {STEPS} steps, largest relative difference: {worst}")
    assert worst["train/loss"] < 1e-5 and worst["train/grad_norm"] < 1e-4, worst
    assert got[STEPS]["train/loss"] < got[1]["train/loss"]
    val_got, val_want = by_step(records(run), "val/loss"), by_step(records(reference), "val/loss")
    assert sorted(val_got) == [5, 10]
    for step in (5, 10):
        for key in ("val/loss", "val/bits_per_byte"):
            assert val_got[step][key] == pytest.approx(val_want[step][key], rel=1e-5), f"step {step} {key}"
    return worst
