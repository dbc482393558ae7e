"""Multi-rank pretraining on CPU (gloo): ZeRO stage equivalence, exact resume after SIGKILL
(also mid-save), SIGTERM preemption, resume on another number of ranks, NaN skipping, a dead
rank, TensorBoard tags. All tests share one token data set built from data/sample/.

Tolerance of the stage-equivalence test: 2 ranks and 1 rank (with gradient accumulation) sum
the same per-sample gradients in a different order (all-reduce vs. accumulation, ZeRO's
partitioned reduce-scatter), so fp32 rounding differs at ~1e-7 relative per step. AdamW
normalises updates and the model is tiny, so over 8 steps the loss stays within 1e-5 relative
and the gradient norm within 1e-4 relative (measured: at most 3e-7 for both); a real bug (a wrong
averaging factor, a lost micro batch, a skipped step) moves both by more than 1e-2.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.datasets import make_token_dataset
from tests.harness import ROOT, VENV_BIN, cpu_env, free_port, remove_orphan_shm_segments, run_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LAUNCHER = ROOT / "launcher" / "pretrain.py"
RECIPE = "configs/pretrain/cpu_tiny.yaml"
GLOBAL_BATCH = 8
STEPS = 12


@pytest.fixture(scope="session")
def token_manifest(tmp_path_factory) -> Path:
    return make_token_dataset(tmp_path_factory.mktemp("tokens"))


def _args(run_dir: Path, manifest: Path, *overrides: str) -> list[str]:
    return ["--config", RECIPE, f"run_dir={run_dir}", f"data.manifests=[{manifest}]",
            f"train.max_steps={STEPS}", "train.micro_batch_size=4", "checkpoint.every=3",
            "checkpoint.keep_last=3", "log.every=1", "train.eval_every=6", "train.eval_batches=2",
            *overrides]


def launch(run_dir: Path, manifest: Path, *overrides: str, num_gpus: int = 2,
           env: dict[str, str] | None = None, timeout: float = 300):
    return run_deepspeed(LAUNCHER, _args(run_dir, manifest, *overrides), num_gpus=num_gpus,
                         timeout=timeout, log_dir=run_dir.parent / f"{run_dir.name}-launch-logs",
                         env=env)


def popen_launch(run_dir: Path, manifest: Path, *overrides: str, env: dict[str, str] | None = None,
                 num_gpus: int = 2) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
           str(LAUNCHER), *_args(run_dir, manifest, *overrides)]
    log = open(run_dir.parent / f"{run_dir.name}-popen.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def metrics(run_dir: Path) -> dict[int, dict]:
    """Last logged record per step (a resumed run logs again the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "train/loss" in rec:
                    out[rec["step"]] = rec
    return out


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = metrics(run_dir)
        if done and max(done) >= step:
            return max(done)
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "COMPLETE.json").is_file())


def rank_log(run_dir: Path, rank: int) -> str:
    path = run_dir / "logs" / f"rank{rank}.log"
    return path.read_text() if path.is_file() else ""


def resumed_line(run_dir: Path) -> str:
    lines = [ln for ln in rank_log(run_dir, 0).splitlines() if "resumed from" in ln]
    assert lines, rank_log(run_dir, 0)[-3000:]
    return lines[-1]


@pytest.fixture(scope="session")
def reference_run(token_manifest, tmp_path_factory) -> Path:
    """Uninterrupted 2-rank ZeRO-2 run of STEPS steps (the recipe's stage), every sample logged."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    launch(run_dir, token_manifest, env={"CRUCIBLE_RECORD_SAMPLES": "1"}).check()
    return run_dir


def _assert_same_tail(run: Path, reference: Path, after: int) -> None:
    got, want = metrics(run), metrics(reference)
    for step in range(after + 1, STEPS + 1):
        assert got[step]["train/loss"] == want[step]["train/loss"], f"step {step}"
        assert got[step]["train/grad_norm"] == want[step]["train/grad_norm"], f"step {step}"


# ------------------------------------------------------------------------------ equivalence

def test_zero_stages_two_ranks_match_one_rank(token_manifest, tmp_path):
    steps = ("train.max_steps=8", "checkpoint.every=0", "train.eval_every=0",
             "checkpoint.write_model_dir=false")
    single = tmp_path / "single"
    launch(single, token_manifest, "train.zero_stage=0", "train.grad_accum_steps=2", *steps,
           num_gpus=1).check()
    want = metrics(single)
    assert len(want) == 8
    # ZeRO-1 is DeepSpeed's ZeRO-2 code (stage_1_and_2) with gradients reduced at the boundary; its
    # 2-rank equivalence is also shown by tests/test_pipeline_parallel.py (pipeline 2 x data 2, ZeRO-1)
    for stage in (0, 2, 3):
        run = tmp_path / f"zero{stage}"
        launch(run, token_manifest, f"train.zero_stage={stage}", *steps).check()
        got = metrics(run)
        for step in range(1, 9):
            assert got[step]["consumed_samples"] == step * GLOBAL_BATCH
            assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-5), \
                f"ZeRO {stage} step {step}"
            assert got[step]["train/grad_norm"] == pytest.approx(want[step]["train/grad_norm"], rel=1e-4), \
                f"ZeRO {stage} step {step}"
        assert got[8]["train/loss"] < got[1]["train/loss"]
    # ranks that exit normally remove DeepSpeed's CPU all-reduce segments themselves
    assert remove_orphan_shm_segments() == []


# ----------------------------------------------------------------------------- exact resume

def test_sigkill_then_rerun_is_bit_identical(token_manifest, reference_run, tmp_path):
    seed = 20240611
    kill_at = random.Random(seed).randint(4, STEPS - 2)
    print(f"SIGKILL after step {kill_at} (drawn with random.Random({seed}))")
    run = tmp_path / "killed"
    proc = popen_launch(run, token_manifest, env={"CRUCIBLE_FAULT_STEP_SLEEP": "0.3"})
    try:
        reached = wait_for_step(run, proc, kill_at)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    complete = complete_steps(run)
    assert complete, "no complete checkpoint before the kill"
    expected = complete[-1]
    print(f"killed at step {reached}; newest complete checkpoint: step {expected}")
    launch(run, token_manifest).check()
    line = resumed_line(run)
    assert f"step {expected}, consumed samples {expected * GLOBAL_BATCH}," in line
    state = json.loads((run / "checkpoints" / f"step_{expected:08d}" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == expected * GLOBAL_BATCH
    assert state["loader"]["consumed_samples"] == expected * GLOBAL_BATCH
    _assert_same_tail(run, reference_run, expected)


def test_sigkill_during_save_resumes_previous_checkpoint(token_manifest, reference_run, tmp_path):
    run = tmp_path / "killed-in-save"
    result = launch(run, token_manifest, env={"CRUCIBLE_FAULT_KILL_IN_SAVE": "6"})
    assert result.returncode != 0
    assert complete_steps(run) == [3]
    assert (run / "checkpoints" / "step_00000006").is_dir()  # partial, never marked complete
    launch(run, token_manifest).check()
    assert "step 3, consumed samples 24," in resumed_line(run)
    _assert_same_tail(run, reference_run, 3)


def test_sigterm_saves_at_next_step_and_exits_zero(token_manifest, reference_run, tmp_path):
    import psutil

    run = tmp_path / "preempted"
    proc = popen_launch(run, token_manifest, env={"CRUCIBLE_FAULT_STEP_SLEEP": "0.3"})
    try:
        wait_for_step(run, proc, 4)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if any("pretrain.py" in part for part in p.cmdline()) and "--local_rank" in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, (run.parent / f"{run.name}-popen.log").read_text()[-3000:]
    stopped = max(metrics(run))
    assert stopped < STEPS
    assert complete_steps(run)[-1] == stopped
    for rank in (0, 1):
        assert "received SIGTERM" in rank_log(run, rank)
    launch(run, token_manifest).check()
    assert f"step {stopped}, consumed samples {stopped * GLOBAL_BATCH}," in resumed_line(run)
    _assert_same_tail(run, reference_run, stopped)


def test_two_ranks_resume_on_one_rank_without_repeating_samples(token_manifest, reference_run, tmp_path):
    """Through the offline conversion: the resume on 1 rank first stops before training (exit 2,
    one line naming the command to run), then ``launcher/checkpoint.py universal`` converts the
    2-rank checkpoint and the same resume continues without repeating a sample."""
    run = tmp_path / "to-one-rank"
    shutil.copytree(reference_run, run)
    overrides = (f"train.max_steps={STEPS + 4}", "train.grad_accum_steps=2")
    refused = launch(run, token_manifest, *overrides, num_gpus=1, env={"CRUCIBLE_RECORD_SAMPLES": "1"})
    said = refused.stdout + "".join(refused.rank_logs.values())
    command = f"python launcher/checkpoint.py universal {run} --step {STEPS} --workers 8"
    assert refused.returncode == 2 and "saved on 2 ranks with ZeRO stage 2; resuming it on 1 ranks" in said \
        and command in said, refused.describe()
    assert max(metrics(run)) == STEPS  # nothing trained
    convert = subprocess.run([str(VENV_BIN / "python"), "launcher/checkpoint.py", "universal", str(run),
                              "--step", str(STEPS), "--workers", "2"],
                             cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240,
                             check=False)
    assert convert.returncode == 0 and f"converted step_{STEPS:08d} in" in convert.stdout, \
        convert.stdout[-3000:] + convert.stderr[-3000:]
    launch(run, token_manifest, *overrides, num_gpus=1, env={"CRUCIBLE_RECORD_SAMPLES": "1"}).check()
    assert f"step {STEPS}, consumed samples {STEPS * GLOBAL_BATCH}," in resumed_line(run)
    assert "universal checkpoint" in resumed_line(run)
    got = metrics(run)
    assert max(got) == STEPS + 4 and got[STEPS + 4]["consumed_samples"] == (STEPS + 4) * GLOBAL_BATCH
    seen: list[str] = []
    for rank in (0, 1):
        for line in (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            seen += json.loads(line)["samples"]
    assert len(seen) == (STEPS + 4) * GLOBAL_BATCH
    assert len(set(seen)) == len(seen), "a sample of the epoch was trained on twice"


# ------------------------------------------------------------- moved and damaged run directories

def test_moved_run_directory_exports_its_own_model(token_manifest, reference_run, tmp_path):
    """A run at x/exp (stopped at step 6) moved to x/exp_old, then a new run trained to step 6
    at x/exp: launcher/export_hf.py on x/exp_old exports x/exp_old's own weights, also when its
    latest.json is the one older versions wrote (absolute paths, which after the move name the
    new run's step 6)."""
    import torch
    from safetensors.torch import load_file

    from model.io import find_model_dir, read_hf_dir

    exp, old = tmp_path / "x" / "exp", tmp_path / "x" / "exp_old"
    shutil.copytree(reference_run, exp, ignore=shutil.ignore_patterns("step_00000009", "step_00000012"))
    latest = {"tag": "step_00000006", "step": 6, "checkpoint": str(exp / "checkpoints" / "step_00000006"),
              "model_dir": str(exp / "checkpoints" / "step_00000006" / "model")}
    (exp / "latest.json").write_text(json.dumps(latest))  # as written before paths were relative
    exp.rename(old)
    launch(exp, token_manifest, "train.max_steps=6", "checkpoint.every=0", "train.eval_every=0",
           "train.seed=7", "train.grad_accum_steps=2", num_gpus=1).check()
    assert json.loads((exp / "latest.json").read_text())["model_dir"] == "checkpoints/step_00000006/model"
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(ROOT / "launcher" / "export_hf.py"), "--model", str(old),
                           "--output", str(out)], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{old / 'latest.json'} names {latest['model_dir']}, outside this run directory" in proc.stderr
    _, exported = read_hf_dir(out)
    own = load_file(old / "checkpoints" / "step_00000006" / "model" / "model.safetensors")
    new = load_file(find_model_dir(exp) / "model.safetensors")
    assert exported.keys() == own.keys()
    for name, tensor in own.items():  # the export only renames and reorders: exact
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    assert not torch.equal(new["embed.weight"], own["embed.weight"])


def _failed_launch_errors(run_dir: Path, manifest: Path) -> list[str]:
    """The error lines of a launch that must fail, after checking it failed without a traceback
    and without blaming a collective (rank output of this launch only)."""
    shutil.rmtree(run_dir.parent / f"{run_dir.name}-launch-logs", ignore_errors=True)
    result = launch(run_dir, manifest)
    output = result.stdout + "".join(result.rank_logs.values())
    assert result.returncode != 0
    assert "Traceback" not in output and "collective operation failed" not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_resume_skips_damaged_and_incomplete_checkpoints(token_manifest, reference_run, tmp_path):
    """Step 12's COMPLETE.json truncated and step 9 without rank 1's optimizer file: both ranks
    skip them with a warning naming the file, resume from step 6 and continue bit for bit as the
    uninterrupted run. With step 6 damaged too nothing is usable: one line, no traceback. A file
    only DeepSpeed's load finds wrong stops the run with one line naming it."""
    import torch

    run = tmp_path / "damaged"
    shutil.copytree(reference_run, run)
    root = run / "checkpoints"
    marker12 = root / "step_00000012" / "COMPLETE.json"
    marker12.write_bytes(marker12.read_bytes()[:40])
    optim9 = next((root / "step_00000009").glob("zero_pp_rank_1_*optim_states.pt"))
    optim9.unlink()
    state6 = root / "step_00000006" / "trainer_state.json"
    saved_state6 = state6.read_bytes()
    state6.write_bytes(b"")

    errors = _failed_launch_errors(run, token_manifest)
    assert len(errors) == 2 and errors[0] == errors[1], errors  # the same line on both ranks
    assert errors[0].startswith("error: no usable checkpoint to resume")
    assert all(str(path) in errors[0] for path in (marker12, optim9, state6))
    state6.write_bytes(saved_state6)

    # rank 1's file of step 6 replaced by a whole archive of something else, listed with its new
    # size: every check passes, DeepSpeed's load on rank 1 fails
    optim6 = next((root / "step_00000006").glob("zero_pp_rank_1_*optim_states.pt"))
    marker6 = root / "step_00000006" / "COMPLETE.json"
    saved_optim6, saved_marker6 = optim6.read_bytes(), marker6.read_bytes()
    torch.save({"not": torch.zeros(3)}, optim6)
    marker = json.loads(saved_marker6)
    marker["files"][optim6.name] = optim6.stat().st_size
    marker6.write_text(json.dumps(marker))
    errors = _failed_launch_errors(run, token_manifest)
    assert any(line.startswith(f"error: cannot resume from {optim6.parent}: loading {optim6} failed")
               for line in errors), errors
    # rank 0 says so too, unless the launcher stopped it first when rank 1 exited
    assert all("loading" in line or "another rank could not load checkpoint" in line for line in errors)
    optim6.write_bytes(saved_optim6)
    marker6.write_bytes(saved_marker6)

    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 6]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))  # later steps must be new
    logged_before = len(rank_log(run, 0))
    launch(run, token_manifest).check()
    log0 = rank_log(run, 0)[logged_before:]
    assert f"skipping damaged checkpoint step_00000012: {marker12} is not valid JSON" in log0
    assert f"skipping damaged checkpoint step_00000009: {optim9} is missing" in log0
    assert "step 6, consumed samples 48," in resumed_line(run)
    _assert_same_tail(run, reference_run, 6)
    assert complete_steps(run) == [6, 9, 12] and json.loads((run / "latest.json").read_text())["step"] == STEPS


# ------------------------------------------------------------------------------- NaN, faults

def test_injected_nan_is_skipped_on_both_ranks(token_manifest, tmp_path):
    import torch

    from model.zero_checkpoint import iter_fp32_weights

    run = tmp_path / "nan"
    launch(run, token_manifest, "train.max_steps=6", "train.max_bad_steps=3",
           env={"CRUCIBLE_FAULT_NAN_STEPS": "2,3", "CRUCIBLE_FAULT_NAN_RANK": "0"}).check()
    got = metrics(run)
    assert [got[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    for rank in (0, 1):
        text = rank_log(run, rank)
        assert "step 2: non-finite loss" in text and "step 3: non-finite loss" in text, text[-2000:]
    for step in complete_steps(run):  # the fp32 weights each checkpoint's shards hold
        weights = iter_fp32_weights(run / "checkpoints" / f"step_{step:08d}")
        assert all(torch.isfinite(t).all() for _, t in weights)
    assert got[6]["train/loss"] == got[6]["train/loss"]  # finite again after the skips


def test_killing_one_rank_makes_the_other_exit_within_timeout(token_manifest, tmp_path):
    """Plain processes joined by env (like torchrun), not the deepspeed launcher (which would
    kill the survivor itself)."""
    run = tmp_path / "dead-rank"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = cpu_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       "CRUCIBLE_FAULT_STEP_SLEEP": "0.2"})
        procs.append(subprocess.Popen(
            [sys.executable, str(LAUNCHER), *_args(run, token_manifest, "train.max_steps=200",
                                                    "train.collective_timeout_s=30")],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        wait_for_step(run, procs[0], 3)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = procs[0].communicate(timeout=60)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None)
    assert waited < 30 + 5
    assert "a collective operation failed" in rank_log(run, 0) + err


# ------------------------------------------------------------------------------- run outputs

def test_run_directory_and_tensorboard_tags(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    required = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/mfu",
                "train/data_wait_fraction", "train/step_time", "train/memory_gb",
                "train/skipped_steps", "val/loss", "val/perplexity", "checkpoint/save_seconds"}
    assert required <= tags, required - tags
    assert len(acc.Scalars("train/loss")) == STEPS
    for name in ("config.yaml", "provenance.json", "deepspeed_config.json", "tokenizer/tokenizer.model",
                 "latest.json"):
        assert (reference_run / name).is_file(), name
    ds = json.loads((reference_run / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == GLOBAL_BATCH and ds["zero_optimization"]["stage"] == 2
    latest = json.loads((reference_run / "latest.json").read_text())
    assert latest["step"] == STEPS
    from model.io import load_model_dir

    assert latest["model_dir"] == f"checkpoints/step_{STEPS:08d}/model"  # relative: the run can move
    model, cfg = load_model_dir(reference_run / latest["model_dir"])
    assert cfg.vocab_size == 512 and sum(p.numel() for p in model.parameters()) > 0
    assert complete_steps(reference_run) == [6, 9, 12]  # keep_last=3
