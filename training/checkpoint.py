"""Checkpoint layout, completion markers, keep-last, resume selection and conversion.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/                 DeepSpeed's files (saved with save_latest=False), plus
        trainer_state.json         client state: step, consumed samples/tokens, loader state,
                                   model config, tokenizer + manifest checksums, world size
        rng_rank<R>.json           each rank's RNG states
        model/                     model directory (safetensors + config + tokenizer), rank 0
        COMPLETE.json              written by rank 0 after a barrier: every rank has finished
        universal/                 DeepSpeed universal checkpoint, made when resuming on
                                   another number of ranks

A directory without ``COMPLETE.json`` is ignored by resume (a crash mid-save) and removed by
pruning. ``<run_dir>/latest.json`` points at the newest complete checkpoint and its model
directory, for tools that take a run directory.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.errors import UserError
from crucible.fileio import atomic_write_json

log = logging.getLogger("crucible.training.checkpoint")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
UNIVERSAL = "universal"
LATEST = "latest.json"
_TAG_RE = re.compile(r"^step_(\d{8,})$")

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
    """Checkpoints in step order; only those with a completion marker unless told otherwise."""
    root = checkpoint_root(run_dir)
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        match = _TAG_RE.match(path.name)
        if not match or not path.is_dir():
            continue
        marker_path = path / MARKER
        if marker_path.is_file():
            found.append(CheckpointInfo(int(match.group(1)), path, json.loads(marker_path.read_text())))
        elif not complete_only:
            found.append(CheckpointInfo(int(match.group(1)), path, {}))
    return sorted(found, key=lambda c: c.step)


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> CheckpointInfo | None:
    """``auto``: newest complete checkpoint (None if there is none); ``never``: None; else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        complete = list_checkpoints(run_dir)
        return complete[-1] if complete else None
    path = Path(resume)
    match = _TAG_RE.match(path.name)
    if not match or not (path / MARKER).is_file():
        raise UserError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint directory "
            f"(expected .../{CHECKPOINTS}/step_NNNNNNNN containing {MARKER}); use auto or never"
        )
    return CheckpointInfo(int(match.group(1)), path, json.loads((path / MARKER).read_text()))


def mark_complete(ckpt_dir: Path, info: dict[str, Any]) -> None:
    """Write the completion marker; call on rank 0 only, after a barrier over all ranks."""
    atomic_write_json(ckpt_dir / MARKER, info)
    model_dir = ckpt_dir / MODEL_DIR
    atomic_write_json(
        ckpt_dir.parent.parent / LATEST,
        {"tag": ckpt_dir.name, "step": info.get("step"), "checkpoint": str(ckpt_dir.resolve()),
         "model_dir": str(model_dir.resolve()) if model_dir.is_dir() else None},
    )


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


# ------------------------------------------------------- universal checkpoints, fp32 weights

def convert_to_universal(ckpt_dir: Path) -> Path:
    """Convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format (rank 0 only).

    Needed to resume on another number of ranks; the result is cached in ``ckpt_dir/universal``
    and written atomically (temporary folder, then rename).
    """
    out = ckpt_dir / UNIVERSAL
    if (out / MARKER).is_file():
        return out
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = ckpt_dir / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir), output_folder=str(tmp), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    ds_to_universal.main(args)
    tmp.rename(out)
    atomic_write_json(out / MARKER, {"source": ckpt_dir.name})
    return out


def full_fp32_state_dict(module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights of a DeepSpeed engine's module, on the host of the rank that
    ``keep``s them (the others get None); every rank must call it (a collective per parameter).

    The fp32 master weights come from the optimizer's partitions (ZeRO 1-3, and DeepSpeed's
    BF16_Optimizer, whose checkpoint files ``zero_to_fp32`` cannot read); without ZeRO and mixed
    precision the module holds them. Parameters are gathered one at a time, so no rank but the
    keeper holds more than one full parameter. Tied parameters appear once.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            full = param.detach()
        if keep:
            state[name] = full.float().cpu().contiguous()
    return state if keep else None
