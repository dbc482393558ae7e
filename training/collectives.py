"""Every ``torch.distributed`` collective the training code runs goes through this module.

Tensor collectives run on the run's device: NCCL accepts only CUDA tensors ("No backend type
associated with device type cpu"), so each helper takes the device and places the values there
itself; no caller can hand a collective a tensor on the wrong device. Object collectives
(pickled Python values, e.g. the resume plan) and barriers use the process group as it is; on
GPUs the group has both backends (``cpu:gloo,cuda:nccl``, see :mod:`training.engine`), so they
stay legal. ``tests/test_collectives.py`` checks that nothing else under ``training/`` calls a
collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def sum_over_ranks(values: torch.Tensor, device: torch.device, group: Any = None) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (or the ranks of ``group``, e.g. a
    sequence-parallel group), as a tensor on ``device``."""
    out = values.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def min_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise minimum of ``values`` over all ranks, as a tensor on ``device``."""
    out = values.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def true_on_every_rank(flag: torch.Tensor) -> bool:
    """Whether a boolean flag (a 0-d tensor on the device that computed it) holds on every rank.

    One all-reduce and one read of the result: the single host sync of the check.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag.item())
    return bool(min_over_ranks(flag.to(torch.float32), flag.device).item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value of ``obj`` on every rank (pickled; small values only)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled)."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    dist.barrier()
