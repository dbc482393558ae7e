"""How the ranks are laid out: data-parallel and sequence-parallel (DeepSpeed-Ulysses) groups.

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


@dataclass(frozen=True)
class Layout:
    """This rank's place: ``world = data_parallel_size x sequence_parallel``."""

    rank: int
    world_size: int
    sequence_parallel: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel

    @property
    def data_parallel_rank(self) -> int:
        """The data-parallel group this rank reads samples for (the same for a whole SP group)."""
        return self.rank // self.sequence_parallel

    @property
    def sequence_parallel_rank(self) -> int:
        """Which chunk of each sample this rank runs."""
        return self.rank % self.sequence_parallel


def data_parallel_size(world_size: int, sequence_parallel: int) -> int:
    """``world / sequence_parallel``, or a :class:`ConfigError` when it does not divide."""
    if world_size % sequence_parallel:
        raise ConfigError(f"train.sequence_parallel={sequence_parallel} must divide the number of ranks "
                          f"({world_size}): launch a multiple of {sequence_parallel} ranks or change it")
    return world_size // sequence_parallel


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


def parallel_groups(world_size: int, sequence_parallel: int) -> dict[str, list[list[int]]]:
    """The ranks of each group: ``sequence`` groups (consecutive ranks) and ``data`` groups (the
    ranks holding the same chunk of different samples), as DeepSpeed's ``parallel_state_sp``
    builds them."""
    sp = sequence_parallel
    dp = data_parallel_size(world_size, sp)
    return {"sequence": [list(range(g * sp, (g + 1) * sp)) for g in range(dp)],
            "data": [list(range(r, world_size, sp)) for r in range(sp)]}


def describe_groups(world_size: int, sequence_parallel: int, limit: int = 4) -> list[str]:
    """Lines for ``--dry-run``: which ranks form each group (the first ``limit`` of each kind)."""
    lines = []
    for kind, groups in parallel_groups(world_size, sequence_parallel).items():
        shown = ", ".join(str(g) for g in groups[:limit]) + (f", ... ({len(groups)} groups)"
                                                               if len(groups) > limit else "")
        lines.append(f"  {kind}-parallel groups ({len(groups)} of {len(groups[0])} rank(s)): {shown}")
    lines.append("  pipeline- and tensor-parallel groups: none (each rank holds every layer whole)")
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
