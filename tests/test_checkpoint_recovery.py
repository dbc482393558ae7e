"""A run directory means itself wherever it is moved or copied, and a damaged checkpoint is
skipped (or, when it was asked for by name or nothing else is left, stops the run with one line).

Checkpoints here have the trainer's layout and markers (``training.checkpoint``) with small
stand-ins for DeepSpeed's files (``torch.save`` archives, as DeepSpeed writes them); the real
2-rank runs are in ``tests/test_pretrain_distributed.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from crucible.errors import DataError, UserError
from crucible.fileio import atomic_write_json
from crucible.run_layout import file_inventory
from model.config import ModelConfig, resolve_model_config
from model.io import find_model_dir, load_model_dir, save_model_dir
from model.transformer import build_transformer
from tests.harness import run_on_ranks
from training import checkpoint as ckpt

WORLD = 2
OPTIM_1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def tiny() -> ModelConfig:
    return resolve_model_config(ModelConfig(preset="tiny"), vocab_size=384)


def make_checkpoint(run_dir: Path, step: int, seed: int = 0, model: bool = True, world: int = WORLD,
                    zero_stage: int = 2) -> Path:
    """A checkpoint as the trainer saves it on ``world`` ranks with ZeRO-2 (DeepSpeed's files
    replaced by small torch archives of the same names)."""
    path = ckpt.checkpoint_root(run_dir) / ckpt.tag_for(step)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    torch.save({"module": torch.randn(64, generator=gen)}, path / "mp_rank_00_model_states.pt")
    for rank in range(world):
        torch.save({"optimizer_state_dict": torch.randn(4096, generator=gen)},
                   path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        ckpt.write_rng_state(path, rank)
    ckpt.write_trainer_state(path, {"step": step, "consumed_samples": 8 * step})
    cfg = tiny()
    if model:
        save_model_dir(path / ckpt.MODEL_FILES, None, cfg, provenance={})
    ckpt.mark_complete(path, {"step": step, "world_size": world, "zero_stage": zero_stage})
    if model:  # as consolidation leaves it: the model directory with its own marker, named by latest.json
        save_model_dir(path / "model", build_transformer(cfg, seed=seed).state_dict(), cfg, provenance={})
        atomic_write_json(path / "model" / "COMPLETE.json", {"files": file_inventory(path / "model")})
        ckpt.write_latest(path, step)
    return path


def fake_ds_to_universal(calls: list):
    """Stands in for DeepSpeed's ``ds_to_universal.main``: one file per call, the call recorded."""
    def convert(args):
        calls.append(args)
        (Path(args.output_folder) / "zero").mkdir(parents=True)
        torch.save({"call": len(calls)}, Path(args.output_folder) / "zero" / "param.pt")
    return convert


def flip_byte(path: Path) -> None:
    """Change one byte in the middle of a file; its size stays the same."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_dir(model_dir)[0].state_dict()


# ----------------------------------------------------------------- moved and copied run dirs

def test_run_directory_records_only_relative_paths(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 10)
    latest = json.loads((run / "latest.json").read_text())
    assert latest == {"tag": "step_00000010", "step": 10, "checkpoint": "checkpoints/step_00000010",
                      "model_dir": "checkpoints/step_00000010/model"}
    marker = json.loads((run / "checkpoints" / "step_00000010" / "COMPLETE.json").read_text())
    assert all(not Path(name).is_absolute() and ".." not in name for name in marker["files"])
    text = "".join(p.read_text() for p in run.rglob("*.json"))
    assert str(tmp_path) not in text  # nothing the run records about itself names its place


def test_moved_run_directory_resolves_to_its_own_model(tmp_path, caplog):
    """runs/x/exp moved to runs/x/exp_old, a new run trained at runs/x/exp: the old directory
    still means its own model, whether its latest.json is relative (now) or absolute (older
    versions, which named the new run's files after the move)."""
    exp, old = tmp_path / "x" / "exp", tmp_path / "x" / "exp_old"
    make_checkpoint(exp, 12, seed=1)
    relative_latest = (exp / "latest.json").read_text()
    shutil.move(exp, old)
    make_checkpoint(exp, 3, seed=2)
    own = old / "checkpoints" / "step_00000012" / "model"
    for latest in (relative_latest, json.dumps({  # as an older version wrote it, before the move
            "tag": "step_00000012", "step": 12, "checkpoint": str(exp / "checkpoints" / "step_00000012"),
            "model_dir": str(exp / "checkpoints" / "step_00000012" / "model")})):
        (old / "latest.json").write_text(latest)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert find_model_dir(old) == own
        assert ("outside this run directory" in caplog.text) == latest.startswith('{"tag": "step_00000012"')
    new_weights, old_weights = weights(exp), weights(old)
    for name, tensor in weights(own).items():
        torch.testing.assert_close(old_weights[name], tensor, rtol=0, atol=0)
    assert not torch.equal(new_weights["embed.weight"], old_weights["embed.weight"])
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(old, copy)
    assert find_model_dir(copy) == copy / "checkpoints" / "step_00000012" / "model"


# --------------------------------------------------------------------- checking a checkpoint

@pytest.mark.parametrize("damage, names", [
    (lambda c: (c / "COMPLETE.json").write_text(""), "COMPLETE.json is not valid JSON (empty)"),
    (lambda c: truncate(c / "COMPLETE.json"), "COMPLETE.json is not valid JSON"),
    (lambda c: (c / OPTIM_1).unlink(), f"{OPTIM_1} is missing"),
    (lambda c: truncate(c / OPTIM_1), f"{OPTIM_1} has"),
    (lambda c: (c / "trainer_state.json").write_text("{}" + " " * 60), "trainer_state.json has"),
    (lambda c: truncate(c / "rng_rank1.json"), "rng_rank1.json has"),
    (lambda c: (c / "model_files" / "model_config.json").unlink(), "model_config.json is missing"),
])
def test_checkpoint_problem_names_the_damaged_file(tmp_path, damage, names):
    path = make_checkpoint(tmp_path, 6)
    assert ckpt.checkpoint_problem(path) is None and ckpt.torch_files_problem(path) is None
    damage(path)
    problem = ckpt.checkpoint_problem(path)
    assert problem is not None and names in problem and str(path) in problem


def test_a_changed_byte_in_a_torch_file_is_found_by_its_crc(tmp_path):
    path = make_checkpoint(tmp_path, 6)
    flip_byte(path / OPTIM_1)  # same size: only the CRCs can tell
    assert ckpt.checkpoint_problem(path) is None
    assert OPTIM_1 in ckpt.torch_files_problem(path) and "CRC" in ckpt.torch_files_problem(path)
    # shared between ranks: each rank reads its share of the files once
    shares = [ckpt.torch_files_problem(path, rank, 2) for rank in range(2)]
    assert sum(p is not None for p in shares) == 1


def test_json_damage_of_the_same_size_is_found(tmp_path):
    path = make_checkpoint(tmp_path, 6)
    state = path / "trainer_state.json"
    state.write_text("x" * state.stat().st_size)
    assert "trainer_state.json is not valid JSON" in ckpt.checkpoint_problem(path)


def test_markers_of_older_versions_are_checked_by_the_files_deepspeed_needs(tmp_path):
    path = make_checkpoint(tmp_path, 6)
    (path / "COMPLETE.json").write_text(json.dumps({"step": 6, "world_size": 2, "zero_stage": 2}))
    assert ckpt.checkpoint_problem(path) is None
    (path / OPTIM_1).unlink()
    assert ckpt.checkpoint_problem(path) == f"{path}/{OPTIM_1} is missing"
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt is empty" in ckpt.checkpoint_problem(path)


# -------------------------------------------------------------------------- resume selection

def test_resume_skips_damaged_checkpoints_with_a_warning_naming_the_file(tmp_path, caplog):
    for step in (6, 9, 12):
        make_checkpoint(tmp_path, step)
    truncate(tmp_path / "checkpoints" / "step_00000012" / "COMPLETE.json")
    (tmp_path / "checkpoints" / "step_00000009" / OPTIM_1).unlink()
    with caplog.at_level("WARNING"):
        assert ckpt.find_resume_checkpoint(tmp_path, "auto").step == 6
    assert "step_00000012/COMPLETE.json is not valid JSON" in caplog.text
    assert f"step_00000009/{OPTIM_1} is missing" in caplog.text
    # a checkpoint asked for by name is never replaced by another one
    with pytest.raises(UserError, match=f"cannot resume from checkpoint.resume=.*{OPTIM_1} is missing"):
        ckpt.find_resume_checkpoint(tmp_path, "step_00000009")
    assert ckpt.find_resume_checkpoint(tmp_path, "step_00000006").step == 6
    # nothing usable left: one line naming every checkpoint's problem
    (tmp_path / "checkpoints" / "step_00000006" / "rng_rank0.json").write_text("{")
    with pytest.raises(UserError) as err:
        ckpt.find_resume_checkpoint(tmp_path, "auto")
    message = str(err.value)
    assert "\n" not in message and message.startswith("no usable checkpoint to resume")
    assert all(ckpt.tag_for(step) in message for step in (6, 9, 12))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    other = make_checkpoint(tmp_path / "other", 6)
    with pytest.raises(UserError, match="is not a checkpoint of this run"):
        ckpt.find_resume_checkpoint(tmp_path / "run", str(other))


def test_pruning_removes_damaged_markers_older_than_the_newest_complete(tmp_path):
    for step in (3, 6, 9):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE.json").write_text("")
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [6, 9]
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=5)
    assert [p.name for p in removed] == ["step_00000003"]


def test_a_damaged_universal_checkpoint_is_converted_again(tmp_path, monkeypatch, caplog):
    from deepspeed.checkpoint import ds_to_universal

    calls: list = []
    monkeypatch.setattr(ds_to_universal, "main", fake_ds_to_universal(calls))
    path = make_checkpoint(tmp_path, 6)
    assert "has no COMPLETE.json: not converted yet" in ckpt.universal_problem(path)
    out = ckpt.convert_to_universal(path, workers=3)
    assert (calls[0].num_extract_workers, calls[0].num_merge_workers) == (3, 3)
    assert ckpt.universal_problem(path) is None
    assert ckpt.convert_to_universal(path) == out and len(calls) == 1  # whole: reused
    (out / "zero" / "param.pt").write_bytes(b"")
    assert "param.pt has 0 bytes" in ckpt.universal_problem(path)
    with caplog.at_level("WARNING"):
        ckpt.convert_to_universal(path)
    assert len(calls) == 2 and "param.pt has 0 bytes" in caplog.text
    assert torch.load(out / "zero" / "param.pt", weights_only=True) == {"call": 2}
    assert ckpt.checkpoint_problem(path) is None  # universal/ is not part of the saved files
    with pytest.raises(UserError, match="workers=0"):
        ckpt.convert_to_universal(path, workers=0)


def _plan(rank: int, world_size: int, plans: list[tuple[str, str]]) -> list[object]:
    """plan_resume on this rank for each (run_dir, ``checkpoint.resume``): (step, universal) or
    the error."""
    from training.engine import DistContext
    from training.trainer import plan_resume

    out: list[object] = []
    for run_dir, resume in plans:
        cfg = SimpleNamespace(run_dir=run_dir, checkpoint=SimpleNamespace(resume=resume),
                              train=SimpleNamespace(zero_stage=2))
        try:
            info, universal = plan_resume(cfg, DistContext(rank, world_size, rank, torch.device("cpu")))
            out.append((info.step, universal))
        except UserError as exc:
            out.append(f"UserError: {exc}")
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_agree_on_the_checkpoint_before_loading(tmp_path, monkeypatch):
    """A damage only rank 1 reads (its share of the CRC checks) moves both ranks to the previous
    checkpoint; a damaged checkpoint named explicitly stops both with the same line. A checkpoint
    saved on 4 ranks resumes on 2 only from a whole universal conversion; without one (or with a
    damaged one) both ranks stop at once with the same line naming the offline command."""
    from deepspeed.checkpoint import ds_to_universal

    run = tmp_path / "run"
    for step in (6, 9, 12):
        make_checkpoint(run, step)
    (run / "checkpoints" / "step_00000012" / "COMPLETE.json").write_text("")
    step9 = run / "checkpoints" / "step_00000009"
    rank1_file = sorted(step9.glob("*.pt"))[1]  # sorted files, every 2nd from rank 1
    flip_byte(rank1_file)
    assert ckpt.torch_files_problem(step9, 0, 2) is None and ckpt.torch_files_problem(step9, 1, 2)

    four = tmp_path / "saved-on-4"
    monkeypatch.setattr(ds_to_universal, "main", fake_ds_to_universal([]))
    ckpt.convert_to_universal(make_checkpoint(four, 15, model=False, world=4))
    damaged = ckpt.convert_to_universal(make_checkpoint(four, 18, model=False, world=4))
    (damaged / "zero" / "param.pt").write_bytes(b"")
    make_checkpoint(four, 21, model=False, world=4)
    plans = [(str(run), "auto"), (str(run), str(step9)), (str(four), "auto"),
             (str(four), "step_00000018"), (str(four), "step_00000015")]
    rank0, rank1 = run_on_ranks(_plan, 2, plans)
    assert rank0[0] == rank1[0] == (6, False)
    assert rank0[1] == rank1[1] and rank1_file.name in rank0[1] and "CRC" in rank0[1]
    assert rank0[2:] == rank1[2:]
    assert rank0[2] == (
        f"UserError: checkpoint {four}/checkpoints/step_00000021 was saved on 4 ranks with ZeRO stage 2; "
        "resuming it on 2 ranks needs its universal conversion "
        f"({four}/checkpoints/step_00000021/universal has no COMPLETE.json: not converted yet, or its "
        f"conversion did not finish): run `python launcher/checkpoint.py universal {four} --step 21 "
        "--workers 8` (offline, once), then start this run again")
    assert "param.pt has 0 bytes" in rank0[3] and f"universal {four} --step 18 --workers 8`" in rank0[3]
    assert rank0[4] == (15, True)


# ------------------------------------------------------------ launcher/checkpoint.py (offline)

def _cli(*argv: str) -> int:
    from launcher.checkpoint import main

    return main(list(argv))


def test_checkpoint_cli_refuses_what_it_cannot_convert(tmp_path, monkeypatch, capsys):
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(ds_to_universal, "main", lambda args: pytest.fail("nothing to convert here"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert _cli("universal", str(run)) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert _cli("universal", str(tmp_path)) == 2
    assert "has no checkpoints/ directory" in capsys.readouterr().err
    assert _cli("universal", str(run), "--step", "3") == 2
    assert "has no checkpoint of step 3 (steps there: none)" in capsys.readouterr().err

    zero0 = make_checkpoint(tmp_path / "zero0", 3, model=False, zero_stage=0)
    assert _cli("universal", str(zero0)) == 2
    err = capsys.readouterr().err
    assert "saved with ZeRO stage 0" in err and "nothing to convert" in err and err.count("\n") == 1

    make_checkpoint(run, 6, model=False)
    (make_checkpoint(run, 9, model=False) / OPTIM_1).unlink()
    assert _cli("universal", str(run), "--step", "9") == 2
    err = capsys.readouterr().err
    assert f"cannot convert: step_00000009: {run}/checkpoints/step_00000009/{OPTIM_1} is missing" in err
    assert _cli("universal", str(run / "checkpoints" / "step_00000006"), "--step", "9") == 2
    assert "--step 9 contradicts the checkpoint directory" in capsys.readouterr().err
    assert _cli("universal", str(run), "--workers", "0") == 2
    assert "--workers 0" in capsys.readouterr().err
    flip_byte(run / "checkpoints" / "step_00000006" / OPTIM_1)
    assert _cli("universal", str(run)) == 2
    err = capsys.readouterr().err
    assert "step_00000009:" in err and "step_00000006:" in err and "CRC" in err


def test_checkpoint_cli_converts_the_newest_whole_checkpoint_once(tmp_path, monkeypatch, capsys, caplog):
    from deepspeed.checkpoint import ds_to_universal

    calls: list = []
    monkeypatch.setattr(ds_to_universal, "main", fake_ds_to_universal(calls))
    run = tmp_path / "run"
    make_checkpoint(run, 6, model=False)
    (make_checkpoint(run, 9, model=False) / OPTIM_1).unlink()
    with caplog.at_level("WARNING"):
        assert _cli("universal", str(run), "--workers", "3") == 0
    assert f"step_00000009/{OPTIM_1} is missing" in caplog.text  # skipped, as a resume would
    assert [(c.input_folder, c.num_extract_workers, c.num_merge_workers) for c in calls] == [
        (str(run / "checkpoints" / "step_00000006"), 3, 3)]
    out = capsys.readouterr().out
    assert "converting step_00000006 (step 6, saved on 2 ranks, ZeRO-2)" in out and "with 3 workers" in out
    assert ckpt.universal_problem(run / "checkpoints" / "step_00000006") is None
    assert _cli("universal", str(run), "--step", "6") == 0 and len(calls) == 1
    assert "already converted" in capsys.readouterr().out
    assert _cli("list", str(run)) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:5] == ["6", "2", "2", "whole", "whole"]
    assert rows[2].split()[:4] == ["9", "2", "2", "-"] and OPTIM_1 in rows[2]


# ----------------------------------------------------------------- tools on a run directory

def test_tools_take_the_newest_checkpoint_with_a_whole_model(tmp_path, caplog):
    run = tmp_path / "run"
    make_checkpoint(run, 10, seed=1)
    newest = make_checkpoint(run, 20, seed=2)
    truncate(newest / "model" / "model.safetensors")
    with caplog.at_level("WARNING"):
        assert find_model_dir(run) == run / "checkpoints" / "step_00000010" / "model"
    assert f"{newest}/model/model.safetensors has" in caplog.text
    with pytest.raises(DataError, match="model directory of checkpoint .* is damaged: .*model.safetensors has"):
        find_model_dir(newest)  # named explicitly: no fallback
    make_checkpoint(run, 30, model=False)  # checkpoint.write_model_dir=false: not a candidate
    (run / "checkpoints" / "step_00000010" / "COMPLETE.json").write_text("")
    with pytest.raises(DataError, match="no checkpoint with a whole model directory") as err:
        find_model_dir(run)
    assert "step_00000020" in str(err.value) and "step_00000010" in str(err.value)
