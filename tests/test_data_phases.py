"""Data-mix phases (``data.phases``): the LR segments, the phase lookup, the config rules, the
phased loader's switch and exact resume around it, and a real run that switches mix and LR
segment at the declared step and reproduces its losses bit for bit after SIGKILLs just before
and just after the switch (configs/pretrain/cpu_anneal.yaml on the test shards)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crucible.errors import ConfigError, DataError
from data_pipeline.loader.config import DataPhase, LoaderConfig, PhaseSchedule
from data_pipeline.loader.phases import build_train_stream, phase_at, phase_start_steps
from data_pipeline.shards.config import ShardConfig
from data_pipeline.shards.writer import write_token_shards
from tests.datasets import read_split_samples, sample_texts, shared_token_dataset
from tests.harness import ROOT, cpu_env
from training.config import PretrainConfig, ScheduleConfig, TrainConfig
from training.schedule import ConfiguredSchedule, PhasedSchedule, configured_schedule

RECIPE = ROOT / "configs" / "pretrain" / "cpu_anneal.yaml"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def news_manifest(manifest, tmp_path_factory) -> Path:
    """News lines only, encoded with the shared tokenizer (no sample in common with ``manifest``)."""
    out = tmp_path_factory.mktemp("phase_news")
    texts = [t for t in sample_texts() if "\n" not in t][-60:][::-1]
    write_token_shards(texts, Path(manifest).parent.parent / "tokenizer", out,
                       ShardConfig(seq_len=64, samples_per_shard=64, validation_fraction=0.0))
    return out / "manifest.json"


def _keys(path: Path) -> set[bytes]:
    return set(read_split_samples(path, "train"))


def _key(row: torch.Tensor) -> bytes:
    return row.numpy().astype("<u2").tobytes()


# ------------------------------------------------------------------------- schedule and lookup

def _phased(segments, starts=(0, 6, 9), total=12, kind="constant") -> PhasedSchedule:
    return PhasedSchedule(1.0, ScheduleConfig(kind=kind, warmup_steps=2, min_lr_ratio=0.1), total,
                          tuple(starts), (None, *segments))


def test_segments_follow_their_phases():
    # phase 1: linear from the stable LR (1.0) at step 6 to 0 at step 11 (phase 2 has no segment)
    lrs = [_phased([PhaseSchedule(kind="linear"), None])(s) for s in range(12)]
    assert lrs[:6] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(lrs[6:], [1.0, 0.8, 0.6, 0.4, 0.2, 0.0], rtol=0, atol=1e-12)
    # phase 2 with its own segment ends phase 1's at step 8; an explicit start LR may jump
    s = _phased([PhaseSchedule(kind="linear", min_lr_ratio=0.5), PhaseSchedule(kind="cosine", start_lr_ratio=0.2)])
    np.testing.assert_allclose([s(6), s(7), s(8)], [1.0, 0.75, 0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose([s(9), s(11)], [0.2, 0.0], rtol=0, atol=1e-12)
    assert 0.0 < s(10) < 0.2
    # constant holds the LR the recipe's cosine had at the phase's first step
    s = _phased([PhaseSchedule(kind="constant")], starts=(0, 6), kind="cosine")
    base = ConfiguredSchedule(1.0, ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1), 12)
    assert [s(k) for k in range(6)] == [base(k) for k in range(6)]
    assert {s(k) for k in range(6, 12)} == {base(6)}
    # a pure function of the step: any order of calls gives the same values
    assert [s(k) for k in reversed(range(12))][::-1] == [s(k) for k in range(12)]


def test_phase_lookup_and_start_tokens():
    cfg = LoaderConfig(manifests=["a"], phases=[DataPhase(start_step=3, manifests=["b"]),
                                                DataPhase(start_tokens=1000, manifests=["c"])])
    starts = phase_start_steps(cfg, tokens_per_step=128, max_steps=20)
    assert starts == [0, 3, 8]  # ceil(1000 / 128)
    assert [phase_at(starts, s) for s in (0, 2, 3, 7, 8, 19)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match=r"data.phases\[1\].start_tokens=1000 \(step 2 .*does not start after"):
        phase_start_steps(cfg, tokens_per_step=512, max_steps=20)
    with pytest.raises(ConfigError, match="not before train.max_steps=8"):
        phase_start_steps(cfg, tokens_per_step=128, max_steps=8)
    # without LR segments the recipe's schedule is used as it was
    assert isinstance(configured_schedule(PretrainConfig(data=cfg), 128), ConfiguredSchedule)


def test_config_rules():
    with pytest.raises(ValueError, match="exactly one of start_step and start_tokens"):
        DataPhase(manifests=["b"])
    with pytest.raises(ValueError, match="exactly one of start_step and start_tokens"):
        DataPhase(start_step=2, start_tokens=10, manifests=["b"])
    with pytest.raises(ValueError, match="needs manifests"):
        DataPhase(start_step=2)
    with pytest.raises(ValueError, match="one weight per manifest"):
        DataPhase(start_step=2, manifests=["b"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="strictly increasing start_step"):
        LoaderConfig(manifests=["a"], phases=[DataPhase(start_step=5, manifests=["b"]),
                                              DataPhase(start_step=5, manifests=["c"])])
    with pytest.raises(ValueError, match="not before train.max_steps=10"):
        PretrainConfig(data=LoaderConfig(manifests=["a"], phases=[DataPhase(start_step=10, manifests=["b"])]),
                       train=TrainConfig(max_steps=10))


# ------------------------------------------------------------------------------ the loader

def _phased_cfg(manifest, news_manifest, start_step=3, **kw) -> LoaderConfig:
    return LoaderConfig(manifests=[str(manifest)], phases=[
        DataPhase(start_step=start_step, manifests=[str(news_manifest)], **kw)])


def test_loader_switches_at_the_step_and_resumes_anywhere_around_it(manifest, news_manifest):
    web, news = _keys(manifest), _keys(news_manifest)
    cfg = _phased_cfg(manifest, news_manifest)
    # micro batch 4, 1 rank, 2 micro batches a step: phase 1 begins with micro batch 6
    loader = build_train_stream(cfg, 4, 0, 1, samples_per_step=8, max_steps=10)
    batches, states = [], [loader.state_dict()]
    for batch in iter(loader):
        batches.append(batch)
        states.append(loader.state_dict())
        if len(batches) == 10:
            break
    origin = [{"web" if _key(r) in web else "news" if _key(r) in news else "?" for r in b} for b in batches]
    assert origin == [{"web"}] * 6 + [{"news"}] * 4
    assert [s["phase"] for s in states] == [0] * 7 + [1] * 4
    # resumed from every position (before, at and after the switch) the batches are the same
    for n in (5, 6, 7):
        resumed = build_train_stream(cfg, 4, 0, 1, samples_per_step=8, max_steps=10)
        resumed.load_state_dict(json.loads(json.dumps(states[n])))
        it = iter(resumed)
        for want in batches[n:]:
            assert torch.equal(next(it), want)


def test_resume_refuses_changes_outside_a_declared_phase(manifest, news_manifest):
    cfg = _phased_cfg(manifest, news_manifest)
    loader = build_train_stream(cfg, 4, 0, 1, samples_per_step=8, max_steps=10)
    it = iter(loader)
    for _ in range(8):  # into phase 1
        next(it)
    state = loader.state_dict()
    # phase 1 has begun: its manifests and its start step are fixed
    swapped = _phased_cfg(news_manifest, manifest)
    with pytest.raises(DataError, match=r"data phase 0 \(data.manifests\).*declare it as a data phase"):
        build_train_stream(swapped, 4, 0, 1, 8, 10).load_state_dict(state)
    with pytest.raises(DataError, match=r"data.phases\[0\] began at step 3 .* declares step 4"):
        build_train_stream(_phased_cfg(manifest, news_manifest, start_step=4), 4, 0, 1, 8, 10).load_state_dict(state)
    # a run without phases (its plain loader state) may declare one from its step on, not before
    plain = build_train_stream(LoaderConfig(manifests=[str(manifest)]), 4, 0, 1, 8, 10)
    pit = iter(plain)
    for _ in range(4):  # 2 steps
        next(pit)
    plain_state = plain.state_dict()
    later = build_train_stream(cfg, 4, 0, 1, 8, 10)
    later.load_state_dict(plain_state)
    assert torch.equal(next(iter(later)), next(pit))
    with pytest.raises(DataError, match=r"at step 2, past the start step 1 .*declare it from step 2 on"):
        build_train_stream(_phased_cfg(manifest, news_manifest, start_step=1), 4, 0, 1, 8, 10) \
            .load_state_dict(plain_state)
    # ... and a plain run still refuses other manifests, pointing at data.phases
    with pytest.raises(DataError, match="same manifests.*data.phases="):
        build_train_stream(LoaderConfig(manifests=[str(news_manifest)]), 4, 0, 1, 8, 10) \
            .load_state_dict(plain_state)


# --------------------------------------------------------------------------- a real run

STEPS, SWITCH = 8, 5  # phase 1 trains steps 5, 6, 7 (0-based)


def _recipe(tmp_path: Path, manifest: Path, news_manifest: Path) -> Path:
    """The shipped annealing recipe on the test shards, shortened: 8 steps with the switch at step
    5, 1 rank, 2 micro batches a step, a checkpoint every step."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["data"]["manifests"] = [str(manifest)]
    cfg["data"]["phases"][0].update(start_step=SWITCH, manifests=[str(news_manifest)])
    # ZeRO 0: a faster engine start; the phases do not depend on the stage
    cfg["train"].update(max_steps=STEPS, grad_accum_steps=2, eval_every=0, eval_full_at_end=False, zero_stage=0)
    cfg["schedule"]["warmup_steps"] = 2
    cfg["checkpoint"].update(every=1, keep_last=4, write_model_dir="never")
    cfg["log"].update(every=1, tensorboard=False)
    path = tmp_path / "anneal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(recipe: Path, run_dir: Path, log: str, env: dict[str, str] | None = None,
           *overrides: str) -> subprocess.Popen:
    """One plain python process (1 rank) of launcher/pretrain.py; its output in ``<log>.log``."""
    cmd = [sys.executable, str(ROOT / "launcher" / "pretrain.py"), "--config", str(recipe),
           f"run_dir={run_dir}", *overrides]
    with open(run_dir.parent / f"{log}.log", "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(env), stdout=out, stderr=subprocess.STDOUT)


def _metrics(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec
    return out


def _hashes(path: Path) -> set[str]:
    return {hashlib.sha1(np.frombuffer(s, dtype="<u2").astype(np.int64).tobytes()).hexdigest()
            for s in read_split_samples(path, "train")}


def _wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        assert p.wait(timeout=300) == 0, f"run failed (rc {p.returncode}): {p.args}"


@pytest.mark.slow
def test_two_phase_run_switches_and_resumes_bit_for_bit_after_sigkill(manifest, news_manifest, tmp_path):
    recipe = _recipe(tmp_path, manifest, news_manifest)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    kill = {"CRUCIBLE_FAULT_KILL_IN_SAVE": str(SWITCH + 2), "CRUCIBLE_FAULT_KILL_RANK": "0"}
    # the uninterrupted run and one SIGKILLed while saving step 7 run side by side
    ref = _start(recipe, reference, "reference", {"CRUCIBLE_RECORD_SAMPLES": "1"})
    dead = _start(recipe, killed, "killed", kill)
    assert dead.wait(timeout=300) == -9
    _wait(ref)
    want = _metrics(reference)
    assert sorted(want) == list(range(1, STEPS + 1))
    # the mix: every sample of steps 0-4 from the web set, of steps 5-7 from the news set
    web, news = _hashes(manifest), _hashes(news_manifest)
    steps = [json.loads(line) for line in (reference / "samples" / "rank0.jsonl").read_text().splitlines()]
    for rec in steps:
        assert set(rec["samples"]) <= (web if rec["step"] < SWITCH else news), rec["step"]
    assert len(steps) == 2 * STEPS
    # the LR: warmup, stable, then linear to 0 over the phase (metrics step k is 0-based step k - 1)
    lrs = [want[k]["train/lr"] for k in range(1, STEPS + 1)]
    peak = yaml.safe_load(RECIPE.read_text())["optim"]["lr"]
    np.testing.assert_allclose(lrs, [peak * r for r in (0.5, 1, 1, 1, 1, 1, 0.5, 0)], rtol=1e-12, atol=0)
    # newest whole checkpoints: step 6 (inside phase 1) and step 5 (at the switch: phase 0 ended)
    complete = sorted(p.name for p in (killed / "checkpoints").glob("step_*") if (p / "COMPLETE.json").exists())
    assert complete[-2:] == ["step_00000005", "step_00000006"], complete
    state = json.loads((killed / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())["loader"]
    assert (state["phase"], state["consumed_samples"]) == (0, SWITCH * 8)
    before = tmp_path / "before"
    shutil.copytree(killed, before)
    after = _start(recipe, killed, "after")  # auto: step 6
    at_switch = _start(recipe, before, "before", None, "checkpoint.resume=step_00000005")
    _wait(after, at_switch)
    for run, first in ((killed, 7), (before, 6)):
        got = _metrics(run)
        for k in range(first, STEPS + 1):
            assert got[k]["train/loss"] == want[k]["train/loss"], (run.name, k)
            assert got[k]["train/grad_norm"] == want[k]["train/grad_norm"], (run.name, k)
            assert got[k]["train/lr"] == want[k]["train/lr"], (run.name, k)
        assert math.isfinite(got[STEPS]["train/loss"])
