"""How the ranks are laid out: data-parallel groups beside sequence-parallel (DeepSpeed-Ulysses),
pipeline-parallel (DeepSpeed's ``PipelineModule``) or tensor-parallel (AutoTP) groups.

With ``train.sequence_parallel`` = N, ranks ``[g N, (g + 1) N)`` form sequence-parallel group g:
they read the same samples (data-parallel rank g of ``world / N``) and each runs the tokens
``[r T / N, (r + 1) T / N)`` of every sample, r being its rank within the group. The groups come
from DeepSpeed's ``parallel_state_sp``, handed to ``deepspeed.initialize`` as its ``mpu``, so
that ZeRO reduces the gradients over all ranks (data- and sequence-parallel) with the
sequence-parallel sum: each rank's loss is the sum of its tokens' losses over the token count of
the whole micro batch, and the sum over the group is the full-sequence mean.
(DeepSpeed's other route, ``sequence_parallel_size`` in its config, builds a device mesh whose
data-parallel group leaves the sequence-parallel peers out: their gradients are never reduced.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crucible.errors import ConfigError

MODEL_PARALLEL_KEYS = ("sequence_parallel", "pipeline_stages", "tensor_parallel")
"""The ``train`` keys of model parallelism (at most one > 1); a checkpoint records each."""


@dataclass(frozen=True)
class Layout:
    """This rank's place: ``world = data_parallel_size x model_parallel``, where the model-parallel
    size is ``sequence_parallel``, ``pipeline_stages`` or ``tensor_parallel`` (at most one > 1).

    Sequence and tensor parallelism group consecutive ranks (group g = ranks ``[g N, (g + 1) N)``,
    data-parallel rank g); a pipeline places stage s on ranks ``[s D, (s + 1) D)`` (DeepSpeed's
    ``PipeDataParallelTopology``: data-parallel rank = rank mod D). Every rank of one model-parallel
    group reads the same samples."""

    rank: int
    world_size: int
    sequence_parallel: int = 1
    pipeline_stages: int = 1
    tensor_parallel: int = 1

    @classmethod
    def of(cls, rank: int, world_size: int, train: Any) -> Layout:
        """The layout of ``train`` (a :class:`training.config.TrainConfig`) on ``world_size`` ranks,
        or a :class:`ConfigError` when its model-parallel size does not divide them."""
        layout = cls(rank, world_size, train.sequence_parallel, train.pipeline_stages, train.tensor_parallel)
        data_parallel_size(world_size, layout.sequence_parallel, layout.pipeline_stages, layout.tensor_parallel)
        return layout

    @property
    def model_parallel(self) -> int:
        return self.sequence_parallel * self.pipeline_stages * self.tensor_parallel

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def data_parallel_rank(self) -> int:
        """The data-parallel group this rank reads samples for (the same for a whole model-parallel group)."""
        if self.pipeline_stages > 1:
            return self.rank % self.data_parallel_size
        return self.rank // self.model_parallel

    @property
    def sequence_parallel_rank(self) -> int:
        """Which chunk of each sample this rank runs."""
        return self.rank % self.sequence_parallel

    @property
    def pipeline_stage(self) -> int:
        return self.rank // self.data_parallel_size if self.pipeline_stages > 1 else 0

    @property
    def tensor_parallel_rank(self) -> int:
        return self.rank % self.tensor_parallel


def data_parallel_size(world_size: int, sequence_parallel: int = 1, pipeline_stages: int = 1,
                       tensor_parallel: int = 1) -> int:
    """``world / model-parallel size``, or a :class:`ConfigError` when it does not divide."""
    for name, size in (("sequence_parallel", sequence_parallel), ("pipeline_stages", pipeline_stages),
                       ("tensor_parallel", tensor_parallel)):
        if world_size % size:
            raise ConfigError(f"train.{name}={size} must divide the number of ranks ({world_size}): launch a "
                              f"multiple of {size} ranks or change it")
    return world_size // (sequence_parallel * pipeline_stages * tensor_parallel)


def check_sequence_parallel(sequence_parallel: int, seq_len: int, n_heads: int, kv_heads: int) -> None:
    """The model-side conditions of Ulysses: every rank gets an equal chunk of the sequence and an
    equal share of the query heads and of the key/value heads after the all-to-all."""
    if sequence_parallel == 1:
        return
    sp = f"train.sequence_parallel={sequence_parallel}"
    if seq_len % sequence_parallel:
        raise ConfigError(f"{sp} must divide the sequence length ({seq_len}): each rank runs an equal chunk")
    if n_heads % sequence_parallel or kv_heads % sequence_parallel:
        raise ConfigError(f"{sp} must divide both model.n_heads ({n_heads}) and the key/value heads "
                          f"({kv_heads}): the all-to-all gives each rank an equal share of both; choose a "
                          "sequence_parallel that divides them")


def check_model_parallel(train: Any, n_layers: int, n_heads: int, kv_heads: int, hidden_dim: int) -> None:
    """The model-side conditions of pipeline and tensor parallelism: at least one block per stage;
    heads, key/value heads and the MLP width split evenly over the tensor-parallel ranks."""
    pp, tp = train.pipeline_stages, train.tensor_parallel
    if pp > 1 and n_layers < pp:
        raise ConfigError(f"train.pipeline_stages={pp} needs at least one block per stage, and the model has "
                          f"model.n_layers={n_layers}: use at most {n_layers} stages")
    if tp > 1 and (n_heads % tp or kv_heads % tp or hidden_dim % tp):
        raise ConfigError(f"train.tensor_parallel={tp} must divide model.n_heads ({n_heads}), the key/value "
                          f"heads ({kv_heads}) and the MLP width ({hidden_dim}): each rank holds an equal share "
                          "of each; choose a tensor_parallel that divides them")


def parallel_groups(world_size: int, sequence_parallel: int = 1, pipeline_stages: int = 1,
                    tensor_parallel: int = 1) -> dict[str, list[list[int]]]:
    """The ranks of each group, as DeepSpeed builds them: ``data`` groups (the ranks that hold
    the same part of the model for different samples) and the model-parallel kind in use:
    ``sequence`` / ``tensor`` groups of consecutive ranks (``parallel_state_sp``, AutoTP's
    (data, tensor) mesh), or ``pipeline`` groups (one rank per stage, ``PipeDataParallelTopology``)."""
    dp = data_parallel_size(world_size, sequence_parallel, pipeline_stages, tensor_parallel)
    if pipeline_stages > 1:
        return {"pipeline": [list(range(d, world_size, dp)) for d in range(dp)],
                "data": [list(range(s * dp, (s + 1) * dp)) for s in range(pipeline_stages)]}
    mp, kind = ((sequence_parallel, "sequence") if sequence_parallel > 1 else (tensor_parallel, "tensor"))
    groups = {"data": [list(range(r, world_size, mp)) for r in range(mp)]}
    if mp > 1:
        groups = {kind: [list(range(g * mp, (g + 1) * mp)) for g in range(dp)], **groups}
    return groups


def describe_groups(world_size: int, sequence_parallel: int = 1, pipeline_stages: int = 1,
                    tensor_parallel: int = 1, limit: int = 4) -> list[str]:
    """Lines for ``--dry-run``: which ranks form each group (the first ``limit`` of each kind)."""
    groups = parallel_groups(world_size, sequence_parallel, pipeline_stages, tensor_parallel)
    lines = []
    for kind, members in groups.items():
        shown = ", ".join(str(g) for g in members[:limit]) + (f", ... ({len(members)} groups)"
                                                                if len(members) > limit else "")
        what = {"pipeline": " (stage 0 first)", "data": ""}.get(kind, "")
        lines.append(f"  {kind}-parallel groups ({len(members)} of {len(members[0])} rank(s)){what}: {shown}")
    absent = [k for k in ("sequence", "pipeline", "tensor") if k not in groups]
    lines.append(f"  {', '.join(absent[:-1])} and {absent[-1]}-parallel groups: none"
                 + (" (each rank holds every layer whole)" if len(absent) == 3 else ""))
    return lines


def initialize_sequence_parallel(sequence_parallel: int) -> tuple[Any, Any]:
    """Create the sequence-parallel groups (a collective: every rank calls it) and return
    DeepSpeed's ``parallel_state_sp`` module (the ``mpu`` for ``deepspeed.initialize``) and this
    rank's sequence-parallel process group."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is not None:
        parallel_state_sp._release_sequence_parallel_groups()  # a second run in the same process
    parallel_state_sp.initialize_sequence_parallel(sequence_parallel)
    return parallel_state_sp, parallel_state_sp.get_sequence_parallel_group()
