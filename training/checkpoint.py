"""Checkpoint layout, completion markers, keep-last, resume selection and conversion.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/                 DeepSpeed's files (saved with save_latest=False), plus
        trainer_state.json         client state: step, consumed samples/tokens, loader state,
                                   model config, tokenizer + manifest checksums, world size
        rng_rank<R>.json           each rank's RNG states
        model_files/               the model directory's files but the weights (config,
                                   tokenizer, provenance, task.json), rank 0
        COMPLETE.json              written by rank 0 after a barrier: every rank has finished;
                                   lists every file of the checkpoint with its size
        model/                     model directory, consolidated from the files above after the
                                   save (:func:`model.io.consolidate_checkpoint`), with its own COMPLETE.json
        universal/                 DeepSpeed universal checkpoint, made offline by
                                   ``launcher/checkpoint.py universal`` to resume on another
                                   number of ranks (ZeRO 1-3); has its own COMPLETE.json

A directory without ``COMPLETE.json`` is ignored by resume (a crash mid-save) and removed by
pruning. ``<run_dir>/latest.json`` points at the newest complete checkpoint and its model
directory, for tools that take a run directory; its paths are relative to the run directory
(see :mod:`crucible.run_layout`), so a moved or copied run directory still means itself.

Resume checks a checkpoint before loading it (:func:`checkpoint_problem`: the marker and the
JSON files parse, every listed file exists with its saved size; :func:`torch_files_problem`:
the CRCs of the ``torch.save`` files); ``auto`` skips a damaged one with a warning naming the
file and takes the previous one.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.errors import UserError
from crucible.fileio import atomic_write_json
from crucible.run_layout import (
    CHECKPOINTS,
    LATEST,
    MARKER,
    MODEL_DIR,
    MODEL_FILES,  # noqa: F401 - part of the checkpoint layout
    file_inventory,
    inventory_problem,
    marked_checkpoints,
    read_record,
    step_of,
    zip_problem,
)

log = logging.getLogger("crucible.training.checkpoint")

STATE_FILE = "trainer_state.json"
UNIVERSAL = "universal"
# DeepSpeed's file of data-parallel rank R (ZeRO 1-3; "bf16_" prefix with its BF16_Optimizer)
_OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")

# model config fields that change the weights' meaning; others (activation checkpointing,
# dtype used outside DeepSpeed) may differ on resume
_MODEL_IDENTITY_EXCLUDE = {"activation_checkpointing", "dtype", "preset"}


class CheckpointMismatch(UserError):
    """The checkpoint to resume was made with another model shape, tokenizer or data."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    marker: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoints in step order: those whose completion marker reads, or with
    ``complete_only=False`` every step directory (``marker`` is ``{}`` when it is missing or
    unreadable). Whether the files are whole is :func:`checkpoint_problem`'s question."""
    root = checkpoint_root(run_dir)
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        step = step_of(path)
        if step is None or not path.is_dir():
            continue
        marker = read_record(path / MARKER)[0] if (path / MARKER).is_file() else None
        if marker is not None:
            found.append(CheckpointInfo(step, path, marker))
        elif not complete_only:
            found.append(CheckpointInfo(step, path, {}))
    return sorted(found, key=lambda c: c.step)


def _is_json_record(rel: str) -> bool:
    return rel == STATE_FILE or rel == f"{MODEL_DIR}/model_config.json" or (
        rel.startswith("rng_rank") and rel.endswith(".json"))


def _legacy_files_problem(ckpt_dir: Path, marker: dict[str, Any]) -> str | None:
    """For markers written before they listed the files: the files DeepSpeed needs for the saved
    world size and ZeRO stage exist and are not empty, and the trainer state is there."""
    if not (ckpt_dir / STATE_FILE).is_file():
        return f"{ckpt_dir / STATE_FILE} is missing"
    torch_files = sorted(ckpt_dir.glob("*.pt"))
    for path in torch_files:
        if path.stat().st_size == 0:
            return f"{path} is empty"
    if not any(p.name.endswith("model_states.pt") for p in torch_files):
        return f"{ckpt_dir} holds no DeepSpeed model states file (*model_states.pt)"
    if int(marker.get("zero_stage", 0) or 0) >= 1:
        ranks = {int(m.group(1)) for p in torch_files if (m := _OPTIM_FILE_RE.match(p.name))}
        for rank in range(int(marker.get("world_size", 1) or 1)):
            if rank not in ranks:
                return f"{ckpt_dir}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt is missing"
    return None


def checkpoint_problem(ckpt_dir: Path) -> str | None:
    """Why the checkpoint in ``ckpt_dir`` cannot be resumed from, as one line naming the file;
    None if it is whole. Cheap: the marker, the trainer state, the RNG states and the model
    config parse, and every file the marker lists exists with its saved size. The bytes inside
    the ``torch.save`` files are :func:`torch_files_problem`'s."""
    if not (ckpt_dir / MARKER).is_file():
        return f"{ckpt_dir} is not a complete checkpoint: it has no {MARKER} (its save did not finish)"
    marker, problem = read_record(ckpt_dir / MARKER)
    if marker is None:
        return problem
    files = marker.get("files")
    if isinstance(files, dict):
        problem = inventory_problem(ckpt_dir, files)
        records = sorted(rel for rel in files if _is_json_record(rel))
    else:
        problem = _legacy_files_problem(ckpt_dir, marker)
        records = sorted(p.relative_to(ckpt_dir).as_posix() for p in
                         [*ckpt_dir.glob("*.json"), *ckpt_dir.glob(f"{MODEL_DIR}/*.json")]
                         if _is_json_record(p.relative_to(ckpt_dir).as_posix()))
    if problem:
        return problem
    for rel in records:
        record, problem = read_record(ckpt_dir / rel)
        if record is None:
            return problem
        if rel == STATE_FILE and not isinstance(record.get("step"), int):
            return f"{ckpt_dir / rel} holds no step"
    return None


def torch_files_problem(ckpt_dir: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """The CRC check (:func:`crucible.run_layout.zip_problem`) of this rank's share of the
    checkpoint's ``torch.save`` files: every ``world_size``-th from ``rank``, so the ranks of a
    run read each file once between them. None if they are whole."""
    for path in sorted(ckpt_dir.glob("*.pt"))[rank::world_size]:
        problem = zip_problem(path)
        if problem:
            return problem
    return None


def resume_candidates(run_dir: str | Path, resume: str) -> list[Path]:
    """The checkpoints ``checkpoint.resume`` may use, in the order to try them: ``never``: none;
    ``auto``: every one with a completion marker, readable or not, newest first; otherwise the
    one named (a path, or a ``step_NNNNNNNN`` name in this run's checkpoints)."""
    if resume == "never":
        return []
    if resume == "auto":
        return marked_checkpoints(run_dir)
    root = checkpoint_root(run_dir)
    path = Path(resume)
    if len(path.parts) == 1 and step_of(path) is not None:
        path = root / path
    if step_of(path) is None or not path.is_dir():
        raise UserError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint directory (expected "
            f"{root}/step_NNNNNNNN containing {MARKER}, or its name step_NNNNNNNN); use auto or never"
        )
    if path.resolve().parent != root.resolve():
        raise UserError(
            f"checkpoint.resume={resume!r} is not a checkpoint of this run ({root}): DeepSpeed's "
            "checkpoint files are pickles, so a run resumes only from its own; copy that run "
            "directory and set run_dir to the copy"
        )
    return [path]


def select_checkpoint(candidates: list[Path], explicit: bool, check: Callable[[Path], str | None],
                      warn: bool = True) -> CheckpointInfo | None:
    """The first candidate ``check`` finds whole. A damaged one is skipped with a warning naming
    the file (``warn``: on the rank that logs); an ``explicit`` one (checkpoint.resume=<path>)
    that is damaged, or damaged candidates only, stop the run with one line. None when there is
    no candidate (a fresh run)."""
    skipped: list[str] = []
    for path in candidates:
        problem = check(path)
        if problem is None:
            marker, _ = read_record(path / MARKER)
            return CheckpointInfo(step_of(path) or 0, path, marker or {})
        if explicit:
            raise UserError(f"cannot resume from checkpoint.resume={str(path)!r}: {problem}; choose "
                            "another checkpoint, or checkpoint.resume=auto (which skips damaged ones)")
        if warn:
            log.warning("skipping damaged checkpoint %s: %s", path.name, problem)
        skipped.append(f"{path.name}: {problem}")
    if skipped:
        raise UserError(
            f"no usable checkpoint to resume in {candidates[0].parent} ({'; '.join(skipped)}); "
            "repair them or move them out of that directory, or set checkpoint.resume=never to "
            "train from step 0 (overwriting them)"
        )
    return None


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> CheckpointInfo | None:
    """The checkpoint to resume in one process (``auto``: the newest whole one, skipping damaged
    ones with a warning; ``never``: None; else the named one, which must be whole); the trainer
    runs the same selection with the checks shared by its ranks (``training.trainer.plan_resume``)."""
    return select_checkpoint(resume_candidates(run_dir, resume), resume not in ("auto", "never"),
                             lambda path: checkpoint_problem(path) or torch_files_problem(path))


def mark_complete(ckpt_dir: Path, info: dict[str, Any]) -> None:
    """Write the completion marker, listing every file of the checkpoint with its size, then
    ``latest.json`` with paths relative to the run directory; call on rank 0 only, after a
    barrier over all ranks (every rank's files are written)."""
    def made_later(rel: str) -> bool:  # the universal conversion, the consolidated model directory
        top = rel.split("/")[0]
        return rel == MARKER or top in (UNIVERSAL, MODEL_DIR) or top.startswith(MODEL_DIR + ".")

    files = file_inventory(ckpt_dir, skip=made_later)
    atomic_write_json(ckpt_dir / MARKER, {**info, "files": files})
    write_latest(ckpt_dir, info.get("step"))


def write_latest(ckpt_dir: Path, step: int | None) -> None:
    """``latest.json`` of the run: this checkpoint, and its model directory once consolidated
    (paths relative to the run directory)."""
    model_dir = ckpt_dir / MODEL_DIR
    atomic_write_json(
        ckpt_dir.parent.parent / LATEST,
        {"tag": ckpt_dir.name, "step": step, "checkpoint": f"{CHECKPOINTS}/{ckpt_dir.name}",
         "model_dir": f"{CHECKPOINTS}/{ckpt_dir.name}/{MODEL_DIR}" if (model_dir / MARKER).is_file() else None},
    )


def consolidate_model_dir(ckpt_dir: Path) -> Path | None:
    """Rank 0 after a save: the checkpoint's model directory from the files just written
    (:func:`model.io.consolidate_checkpoint`, no collective), then ``latest.json``
    names it if this is still the newest checkpoint. A failure is logged, not raised: the
    checkpoint itself is whole, and ``launcher/consolidate.py`` or any reader of the run
    directory makes the model directory later."""
    from model.io import consolidate_checkpoint

    try:
        out = consolidate_checkpoint(ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - the checkpoint stays usable; say why and how to retry
        log.error("could not write the model directory of %s (%s: %s); the checkpoint is whole: run "
                  "`python launcher/consolidate.py %s` to write it", ckpt_dir, type(exc).__name__, exc, ckpt_dir)
        return None
    latest, _ = read_record(ckpt_dir.parent.parent / LATEST)
    if latest is not None and latest.get("tag") == ckpt_dir.name:
        write_latest(ckpt_dir, latest.get("step"))
    return out


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older
    than the newest complete one (left by a crash mid-save). Rank 0 only."""
    complete = list_checkpoints(run_dir)
    if not complete:
        return []
    newest = complete[-1].step
    doomed = [c.path for c in complete[:-keep_last]] if len(complete) > keep_last else []
    doomed += [c.path for c in list_checkpoints(run_dir, complete_only=False)
               if not c.marker and c.step < newest]
    for path in doomed:
        (path / MARKER).unlink(missing_ok=True)  # unmark first: a crash mid-delete stays ignored
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoint %s", path)
    return doomed


def write_trainer_state(ckpt_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_json(ckpt_dir / STATE_FILE, state)


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / STATE_FILE).read_text())


def model_identity(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_cfg.items() if k not in _MODEL_IDENTITY_EXCLUDE}


def check_compatible(state: dict[str, Any], model_cfg: dict[str, Any], tokenizer_sha256: str | None) -> None:
    """Refuse to resume a checkpoint whose model shape or tokenizer differs from this run's."""
    saved = model_identity(state.get("model_config", {}))
    current = model_identity(model_cfg)
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise CheckpointMismatch(
            f"cannot resume: the checkpoint was trained with another model config ({details}); "
            "use the same model settings, another run_dir, or checkpoint.resume=never"
        )
    saved_tok = state.get("tokenizer_sha256")
    if saved_tok and tokenizer_sha256 and saved_tok != tokenizer_sha256:
        raise CheckpointMismatch(
            f"cannot resume: the checkpoint was trained with tokenizer sha256 {saved_tok[:12]}... "
            f"but the data now uses {tokenizer_sha256[:12]}...; use the same tokenizer's shards, "
            "another run_dir, or checkpoint.resume=never"
        )


# ---------------------------------------------------------------- RNG states (JSON, no pickle)

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def write_rng_state(ckpt_dir: Path, rank: int) -> None:
    atomic_write_json(ckpt_dir / f"rng_rank{rank}.json", rng_state())


def restore_rng_state(ckpt_dir: Path, rank: int) -> bool:
    path = ckpt_dir / f"rng_rank{rank}.json"
    if not path.is_file():
        return False
    set_rng_state(json.loads(path.read_text()))
    return True


# ------------------------------------------------------------------ universal checkpoints

def universal_problem(ckpt_dir: Path) -> str | None:
    """Why ``ckpt_dir`` has no whole universal conversion (none made yet, or one whose files no
    longer match its ``COMPLETE.json`` inventory), as one line; None when ``ckpt_dir/universal``
    is whole. Cheap (file sizes only): every rank of a resume can afford it."""
    out = ckpt_dir / UNIVERSAL
    if not (out / MARKER).is_file():
        return f"{out} has no {MARKER}: not converted yet, or its conversion did not finish"
    marker, problem = read_record(out / MARKER)
    if marker is None:
        return problem
    return inventory_problem(out, marker.get("files") or {})


def convert_to_universal(ckpt_dir: Path, workers: int = 1) -> Path:
    """Convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format, offline (one process;
    ``launcher/checkpoint.py universal`` runs it), with ``workers`` parallel extract and merge
    processes (``ds_to_universal``'s ``num_extract_workers`` / ``num_merge_workers``).

    Needed to resume on another number of ranks. The result is cached in ``ckpt_dir/universal``
    with its own ``COMPLETE.json`` inventory and written atomically (a temporary folder, then a
    rename): a whole conversion is reused, a damaged one (:func:`universal_problem`) made again.
    """
    if workers < 1:
        raise UserError(f"workers={workers}: the conversion needs at least 1 worker process")
    state = read_trainer_state(ckpt_dir) if (ckpt_dir / STATE_FILE).is_file() else {}
    for key in ("pipeline_stages", "tensor_parallel"):
        if int(state.get(key, 1) or 1) > 1:
            raise UserError(f"{ckpt_dir} was saved with train.{key}={state[key]}: its universal conversion is not "
                            "supported (not verified for pipeline and AutoTP checkpoints); resume it on the number "
                            "of ranks that saved it")
    out = ckpt_dir / UNIVERSAL
    problem = universal_problem(ckpt_dir)
    if problem is None:
        return out
    if (out / MARKER).is_file():
        log.warning("converting %s again: its universal checkpoint is damaged (%s)", ckpt_dir.name, problem)
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = ckpt_dir / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir), output_folder=str(tmp), num_extract_workers=workers,
        num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    ds_to_universal.main(args)
    tmp.rename(out)
    # ds_to_universal names its output folder (still the temporary one) in <ckpt_dir>/latest_universal;
    # the trainer loads with tag=universal and never reads it, but a DeepSpeed tool might
    if (ckpt_dir / "latest_universal").is_file():
        (ckpt_dir / "latest_universal").write_text(UNIVERSAL)
    atomic_write_json(out / MARKER, {"source": ckpt_dir.name, "workers": workers,
                                     "files": file_inventory(out, skip=lambda rel: rel == MARKER)})
    return out
