"""The full fp32 weights of a DeepSpeed checkpoint, read one tensor at a time.

A save writes each rank's shards and the client state only; the model directory is made from
those files afterwards by :func:`model.io.consolidate_checkpoint` (streaming this module's
:func:`iter_fp32_weights` into safetensors shards) at the end of a run, after each save
(``checkpoint.write_model_dir=every_save``), on demand (:func:`model.io.find_model_dir`) or by
``launcher/consolidate.py``. This module knows DeepSpeed's file layouts and nothing of the
model directory.

How the files are read: DeepSpeed's ``*.pt`` files are zip archives whose tensor storages are
stored uncompressed. Each file's structure is loaded without its data (``torch.load`` with
``weights_only=True`` under ``FakeTensorMode``, with inert stand-ins for the three DeepSpeed
classes the optimizer files name), which gives every tensor's byte offset in the file; then
exactly the bytes of one parameter's fragment are read from each rank's file into a tensor
allocated for that parameter. Nothing is unpickled beyond plain containers, nothing is
memory-mapped (mapped pages would count in the resident memory and stay cached), and the extra
memory is one full parameter at a time.

Layouts read (DeepSpeed 0.19; ``deepspeed/utils/zero_to_fp32.py`` and
``deepspeed/checkpoint/ds_to_universal.py`` describe them):

* ZeRO 1/2 (``zero_pp_rank_R_mp_rank_00_optim_states.pt``) and DeepSpeed's BF16_Optimizer
  (``bf16_zero_pp_rank_R_...``, bf16 with ZeRO 1): per parameter group, every rank holds one
  equal-sized fp32 partition of the group's flat buffer; ``param_slice_mappings`` gives, per
  rank, each parameter fragment's start and length in that partition. The fragment's place in
  the parameter follows from the rank's partition offset.
* ZeRO 3 (``fp32_flat_groups``): each parameter is split into ``ceil(numel / world)`` elements
  per rank (the last padded), laid end to end in the rank's flat groups in ``param_shapes``
  order.
* ZeRO 0 (``mp_rank_00_model_states.pt`` alone): the module's weights as trained.
* Pipelines (``train.pipeline_stages`` = P, ZeRO 1): the ZeRO 1 layout per stage s
  (``mp_rank_0s_model_states.pt``, ``zero_pp_rank_R_mp_rank_0s_optim_states.pt``) under the
  pipeline's layer names, mapped to the model's by :func:`model.pipeline.model_name` (the
  ``layer_NN-model_states.pt`` files hold the same weights in the training dtype).
* Tensor parallelism (``train.tensor_parallel`` = T, DeepSpeed AutoTP): each of the above per
  tensor-parallel rank m (``mp_rank_0m_model_states.pt``, ``zero_pp_rank_R_mp_rank_0m_optim_states.pt``),
  holding that rank's shards; a split parameter is the concatenation of its T shards along
  :func:`model.tensor_parallel.partition_dim`, a replicated one is taken from rank 0.

Frozen parameters come from the model states file(s); tied parameters (DeepSpeed's
``shared_params``) appear once, under the name that owns the storage.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crucible.errors import DataError

log = logging.getLogger("crucible.model.zero_checkpoint")

_OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_MODEL_STATES = "mp_rank_00_model_states.pt"
_TP_OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_TP_MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_TRAINER_STATE = "trainer_state.json"  # training.checkpoint.STATE_FILE (this module imports nothing of training)
# Classes DeepSpeed pickles into its optimizer files; replaced by an inert record on reading.
_DEEPSPEED_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


class _Record:
    """Inert stand-in for a DeepSpeed class in a checkpoint: keeps its arguments and state."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"value": state}


def _structure(path: Path) -> dict[str, Any]:
    """The objects of a ``torch.save`` file with fake tensors (shape, dtype, place in the file)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with torch.serialization.safe_globals([(_Record, name) for name in _DEEPSPEED_CLASSES]), \
                FakeTensorMode():
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to parse names the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read the structure of {path}: {first}; is it a DeepSpeed checkpoint "
                        "file written by this project (DeepSpeed 0.19)?") from None


@dataclass
class _Slice:
    """``numel`` elements of a stored tensor starting at element ``start``."""

    path: Path
    byte_offset: int  # of element 0 of the tensor in the file
    dtype: torch.dtype
    start: int
    numel: int


def _stored(path: Path, tensor: torch.Tensor) -> _Slice:
    storage = tensor.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if offset is None:
        raise DataError(f"{path}: this torch ({torch.__version__}) does not report where a tensor "
                        "lies in a checkpoint file; consolidate with torch >= 2.5")
    return _Slice(path, offset + tensor.storage_offset() * tensor.element_size(), tensor.dtype, 0,
                  tensor.numel())


@dataclass
class _Files:
    """Open files, read by exact byte ranges."""

    handles: dict[Path, Any] = field(default_factory=dict)
    bytes_read: int = 0

    def read_into(self, piece: _Slice, out: torch.Tensor) -> None:
        """Fill the flat fp32 tensor ``out`` (``piece.numel`` elements) from the file."""
        handle = self.handles.get(piece.path)
        if handle is None:
            handle = self.handles[piece.path] = open(piece.path, "rb")  # noqa: SIM115 - closed in close()
        itemsize = torch.empty((), dtype=piece.dtype).element_size()
        target = out if piece.dtype == out.dtype else torch.empty(piece.numel, dtype=piece.dtype)
        view = memoryview(target.view(torch.uint8).numpy())
        handle.seek(piece.byte_offset + piece.start * itemsize)
        got = handle.readinto(view)
        if got != piece.numel * itemsize:
            raise DataError(f"{piece.path} is truncated: {got} of {piece.numel * itemsize} bytes at "
                            f"offset {piece.byte_offset + piece.start * itemsize}")
        self.bytes_read += got
        if target is not out:
            out.copy_(target)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]
    pieces: list[tuple[int, _Slice]]  # (element offset in the full parameter, slice)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _shapes(model_states: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    return [{name: tuple(shape) for name, shape in group.items()}
            for group in model_states.get("param_shapes") or []]


def _frozen_zero12(path: Path, model_states: dict[str, Any]) -> list[_Param]:
    shapes = model_states.get("frozen_param_shapes") or {}
    fragments = model_states.get("frozen_param_fragments") or {}
    return [_Param(name, tuple(shape), [(0, _stored(path, fragments[name]))]) for name, shape in shapes.items()]


def _plan_partitioned(ckpt_dir: Path, files: dict[int, Path], model_states: dict[str, Any],
                      model_path: Path | None = None) -> list[_Param]:
    """ZeRO 1/2 and BF16_Optimizer: fragments from each rank's ``param_slice_mappings``
    (``model_path``: the model states file, ``mp_rank_00_model_states.pt`` unless given)."""
    ranks = sorted(files)
    states = {r: _structure(files[r])["optimizer_state_dict"] for r in ranks}
    shapes = _shapes(model_states)
    params: list[_Param] = []
    for g, group_shapes in enumerate(shapes):
        fragments: dict[str, list[tuple[int, _Slice]]] = {}
        for r in ranks:
            state = states[r]
            mappings = state.get("param_slice_mappings")
            if mappings is None:
                raise DataError(f"{files[r]} has no param_slice_mappings (written by a DeepSpeed "
                                "older than 0.10?); consolidate it with DeepSpeed's zero_to_fp32.py")
            partition = state["single_partition_of_fp32_groups"][g]
            for name, address in mappings[g].items():
                start, numel = int(address.state["start"]), int(address.state["numel"])
                piece = _stored(files[r], partition)
                piece.start, piece.numel = start, numel
                fragments.setdefault(name, []).append((r * partition.numel() + start, piece))
        for name, shape in group_shapes.items():
            found = sorted(fragments.get(name, []), key=lambda item: item[0])
            if not found:
                raise DataError(f"{ckpt_dir}: no rank's optimizer file holds parameter {name}")
            first = found[0][0]
            params.append(_Param(name, shape, [(pos - first, piece) for pos, piece in found]))
    return params + _frozen_zero12(model_path or ckpt_dir / _MODEL_STATES, model_states)


class _FlatSegments:
    """One rank's ZeRO-3 flat groups, addressed as one concatenated buffer."""

    def __init__(self, path: Path, groups: list[torch.Tensor]) -> None:
        self.parts = [_stored(path, t) for t in groups]
        self.numel = sum(p.numel for p in self.parts)

    def pieces(self, start: int, numel: int) -> Iterator[tuple[int, _Slice]]:
        """(offset in the requested range, slice) covering ``numel`` elements from ``start``."""
        base, done = 0, 0
        for part in self.parts:
            lo, hi = max(start + done, base), min(start + numel, base + part.numel)
            if lo < hi:
                yield done, _Slice(part.path, part.byte_offset, part.dtype, lo - base, hi - lo)
                done += hi - lo
            base += part.numel
        if done != numel:
            raise DataError(f"{self.parts[0].path}: the flat groups end before element {start + numel}")


def _plan_zero3(ckpt_dir: Path, files: dict[int, Path], model_files: dict[int, Path]) -> list[_Param]:
    """ZeRO 3: per-parameter partitions of ``ceil(numel / world)`` elements on every rank."""
    world = len(files)
    flats = {r: _FlatSegments(files[r], _structure(files[r])["optimizer_state_dict"]["fp32_flat_groups"])
             for r in sorted(files)}
    model_states = {r: _structure(model_files[r]) for r in sorted(model_files)}
    params: list[_Param] = []
    offset = 0
    for group in _shapes(model_states[0]):
        for name, shape in group.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world)
            pieces: list[tuple[int, _Slice]] = []
            for r in range(world):
                take = max(0, min(per_rank, numel - r * per_rank))
                if take:
                    pieces += [(r * per_rank + at, piece) for at, piece in flats[r].pieces(offset, take)]
            params.append(_Param(name, shape, pieces))
            offset += per_rank
    for name, shape in (model_states[0].get("frozen_param_shapes") or {}).items():
        numel = math.prod(shape)
        per_rank = math.ceil(numel / world)
        pieces = []
        for r in range(world):
            take = max(0, min(per_rank, numel - r * per_rank))
            if take:
                piece = _stored(model_files[r], model_states[r]["frozen_param_fragments"][name])
                piece.numel = take
                pieces.append((r * per_rank, piece))
        params.append(_Param(name, tuple(shape), pieces))
    return params


def _plan_module(path: Path, model_states: dict[str, Any]) -> list[_Param]:
    """ZeRO 0: the module's own weights; a tied one (the same bytes under a second name) once."""
    shared = set((model_states.get("shared_params") or {}).keys())
    params, seen = [], set()
    for name, t in model_states["module"].items():
        piece = _stored(path, t)
        where = (piece.byte_offset, tuple(t.shape), t.stride(), t.dtype)
        if name in shared or where in seen:
            continue
        seen.add(where)
        params.append(_Param(name, tuple(t.shape), [(0, piece)]))
    return params


@dataclass
class _ShardedParam:
    """A parameter saved by T tensor-parallel ranks: ``shards[m]`` is rank m's part, concatenated
    along ``dim``; ``dim`` None: replicated, ``shards`` holds rank 0's whole copy only."""

    name: str
    shape: tuple[int, ...]
    dim: int | None
    shards: list[_Param]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tensor_parallel_size(ckpt_dir: Path) -> int:
    """T of the run that saved ``ckpt_dir``: its trainer state's ``tensor_parallel`` (1 when the
    file or the key is absent: a checkpoint of another tool, or of a run before tensor parallelism),
    at least the number of ``mp_rank_*_model_states.pt`` files present."""
    saved = _trainer_state(ckpt_dir).get("tensor_parallel", 1)
    if not isinstance(saved, int) or saved < 1:
        raise DataError(f"{ckpt_dir / _TRAINER_STATE} records tensor_parallel={saved!r}, not a positive "
                        "integer; is the checkpoint whole?")
    present = [int(m.group(1)) for p in ckpt_dir.glob("mp_rank_*_model_states.pt")
               if (m := _TP_MODEL_RE.match(p.name))]
    return max([saved, *(r + 1 for r in present)])


def _plan_tensor_parallel(ckpt_dir: Path, tp: int) -> list[_ShardedParam]:
    """Per tensor-parallel rank the plan of its own files (ZeRO 0/1/2 as without tensor
    parallelism), the shards of each parameter paired up by name."""
    from model.tensor_parallel import partition_dim

    optim: dict[int, dict[int, Path]] = {m: {} for m in range(tp)}
    for path in ckpt_dir.glob("*_optim_states.pt"):
        match = _TP_OPTIM_RE.match(path.name)
        if match and int(match.group(3)) < tp:
            optim[int(match.group(3))][int(match.group(2))] = path
    model_paths = [ckpt_dir / f"mp_rank_{m:02d}_model_states.pt" for m in range(tp)]
    for m, model_path in enumerate(model_paths):  # every rank's file there before any is read
        if not model_path.is_file():
            raise DataError(f"{ckpt_dir} was saved by {tp} tensor-parallel ranks and {model_path.name} (rank "
                            f"{m}'s model states) is missing: copy the whole checkpoint directory, or "
                            "consolidate an earlier checkpoint")
    per_rank: list[dict[str, _Param]] = []
    for m, model_path in enumerate(model_paths):
        files = optim[m]
        if m and sorted(files) != sorted(optim[0]):
            raise DataError(f"{ckpt_dir}: optimizer files of data-parallel ranks {sorted(files)} for tensor-parallel "
                            f"rank {m} but {sorted(optim[0])} for rank 0; a rank's file is missing")
        if files and sorted(files) != list(range(len(files))):
            raise DataError(f"{ckpt_dir}: optimizer files of data-parallel ranks {sorted(files)} for "
                            f"tensor-parallel rank {m} (expected 0..{len(files) - 1}); a rank's file is missing")
        states = _structure(model_path)
        params = (_plan_partitioned(ckpt_dir, files, states, model_path) if files
                  else _plan_module(model_path, states))
        per_rank.append({p.name: p for p in params})
    merged: list[_ShardedParam] = []
    for name, first in per_rank[0].items():
        dim = partition_dim(name)
        if dim is None:
            merged.append(_ShardedParam(name, first.shape, None, [first]))
            continue
        shards = []
        for m, params in enumerate(per_rank):
            shard = params.get(name)
            if shard is None or shard.shape != first.shape:
                raise DataError(f"{ckpt_dir}: tensor-parallel rank {m} holds "
                                f"{'no ' + name if shard is None else f'{name} of shape {shard.shape}'} "
                                f"(rank 0: {first.shape}); the checkpoint's ranks do not belong together")
            shards.append(shard)
        shape = list(first.shape)
        shape[dim] *= tp
        merged.append(_ShardedParam(name, tuple(shape), dim, shards))
    return merged


def _trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """The checkpoint's trainer state (empty when absent: a checkpoint of another tool)."""
    import json

    state_path = ckpt_dir / _TRAINER_STATE
    if not state_path.is_file():
        return {}
    try:
        state = json.loads(state_path.read_text())
    except ValueError as exc:
        raise DataError(f"{state_path} is not a readable trainer state ({exc}); is the checkpoint whole?") from None
    return state if isinstance(state, dict) else {}


def _plan_pipeline(ckpt_dir: Path, stages: int) -> list[_Param]:
    """Pipeline checkpoints (``train.pipeline_stages`` = P, ZeRO-1): per stage s its own ZeRO 1
    files (``mp_rank_0s_model_states.pt``, ``zero_pp_rank_R_mp_rank_0s_optim_states.pt``), the
    pipeline's parameter names mapped to the Transformer's (:func:`model.pipeline.model_name`); the
    tied embedding, held by the first and the last stage, is taken once."""
    from model.config import ModelConfig
    from model.pipeline import model_name

    state = _trainer_state(ckpt_dir)
    if "model_config" not in state:
        raise DataError(f"{ckpt_dir} holds a {stages}-stage pipeline checkpoint without the model config in its "
                        f"{_TRAINER_STATE}; consolidate a checkpoint written by this project")
    cfg = ModelConfig.model_validate(state["model_config"])
    optim: dict[int, dict[int, Path]] = {s: {} for s in range(stages)}
    for path in ckpt_dir.glob("*_optim_states.pt"):
        match = _TP_OPTIM_RE.match(path.name)
        if match and int(match.group(3)) < stages:
            optim[int(match.group(3))][int(match.group(2))] = path
    params: list[_Param] = []
    seen: set[str] = set()
    for stage in range(stages):
        model_path = ckpt_dir / f"mp_rank_{stage:02d}_model_states.pt"
        files = optim[stage]
        if not model_path.is_file() or not files or sorted(files) != list(range(len(files))):
            raise DataError(f"{ckpt_dir} was saved by a {stages}-stage pipeline and stage {stage}'s files are "
                            f"incomplete ({model_path.name}, optimizer files of data-parallel ranks "
                            f"{sorted(files)}): copy the whole checkpoint directory, or consolidate an earlier one")
        for param in _plan_partitioned(ckpt_dir, files, _structure(model_path), model_path):
            param.name = model_name(param.name, cfg)
            if param.name not in seen:
                seen.add(param.name)
                params.append(param)
    return params


def plan(ckpt_dir: str | Path) -> list[_Param] | list[_ShardedParam]:
    """Where every parameter's bytes lie in the checkpoint's files (reads structures only)."""
    ckpt_dir = Path(ckpt_dir)
    stages = int(_trainer_state(ckpt_dir).get("pipeline_stages", 1) or 1)
    if stages > 1 or any(ckpt_dir.glob("layer_*-model_states.pt")):
        return _plan_pipeline(ckpt_dir, max(stages, len(list(ckpt_dir.glob("mp_rank_*_model_states.pt")))))
    tp = _tensor_parallel_size(ckpt_dir)
    if tp > 1:
        return _plan_tensor_parallel(ckpt_dir, tp)
    optim: dict[int, Path] = {}
    for path in ckpt_dir.glob("*_optim_states.pt"):
        m = _OPTIM_RE.match(path.name)
        if m:
            optim[int(m.group(2))] = path
    zero3_models = {int(m.group(1)): p for p in ckpt_dir.glob("zero_pp_rank_*_model_states.pt")
                    if (m := _ZERO3_MODEL_RE.match(p.name))}
    if optim and sorted(optim) != list(range(len(optim))):
        raise DataError(f"{ckpt_dir}: optimizer files of ranks {sorted(optim)} (expected 0..{len(optim) - 1}); "
                        "a rank's file is missing")
    if zero3_models:
        if sorted(zero3_models) != sorted(optim):
            raise DataError(f"{ckpt_dir}: ZeRO-3 model states of ranks {sorted(zero3_models)} but optimizer "
                            f"files of ranks {sorted(optim)}; a rank's file is missing")
        return _plan_zero3(ckpt_dir, optim, zero3_models)
    model_path = ckpt_dir / _MODEL_STATES
    if not model_path.is_file():
        raise DataError(f"{ckpt_dir} holds no DeepSpeed model states file ({_MODEL_STATES}); pass a "
                        "checkpoint directory (<run_dir>/checkpoints/step_NNNNNNNN)")
    model_states = _structure(model_path)
    if optim:
        return _plan_partitioned(ckpt_dir, optim, model_states)
    return _plan_module(model_path, model_states)


def iter_fp32_weights(ckpt_dir: str | Path, stats: dict[str, int] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full fp32 tensor)`` for every parameter of a DeepSpeed checkpoint, one at a time,
    each read from exactly its bytes in the ranks' files; ``stats`` (if given) receives
    ``bytes_read`` and ``largest_tensor_bytes``."""
    params = plan(ckpt_dir)
    files = _Files()
    try:
        for param in params:
            if isinstance(param, _ShardedParam):
                full = _read_sharded(ckpt_dir, param, files)
            else:
                full = _read(ckpt_dir, param, files)
            if stats is not None:
                stats["largest_tensor_bytes"] = max(stats.get("largest_tensor_bytes", 0), full.nbytes)
            yield param.name, full
    finally:
        if stats is not None:
            stats["bytes_read"] = files.bytes_read
        files.close()


def _read(ckpt_dir: Path, param: _Param, files: _Files) -> torch.Tensor:
    """``param`` whole, in fp32, from its fragments."""
    full = torch.empty(param.numel, dtype=torch.float32)
    covered = 0
    for at, piece in param.pieces:
        if at < 0 or at + piece.numel > param.numel:
            raise DataError(f"{piece.path}: a fragment of {param.name} lies outside its "
                            f"{param.numel} elements")
        files.read_into(piece, full[at: at + piece.numel])
        covered += piece.numel
    if covered != param.numel:
        raise DataError(f"{ckpt_dir}: the ranks' files hold {covered} of the {param.numel} "
                        f"elements of {param.name}")
    return full.view(param.shape)


def _read_sharded(ckpt_dir: Path, param: _ShardedParam, files: _Files) -> torch.Tensor:
    """A tensor-parallel parameter whole: each rank's shard read in turn and copied into its place
    (the full parameter and one shard in memory)."""
    if param.dim is None:
        return _read(ckpt_dir, param.shards[0], files)
    full = torch.empty(param.shape, dtype=torch.float32)
    at = 0
    for shard in param.shards:
        part = _read(ckpt_dir, shard, files)
        full.narrow(param.dim, at, part.shape[param.dim]).copy_(part)
        at += part.shape[param.dim]
    return full
