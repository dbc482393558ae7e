"""Micro batches of task features for one rank, epoch after epoch, resumable."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from crucible.errors import DataError
from training.tasks.base import TaskKind
from training.tasks.features import feature_rows


class TaskBatches:
    """Micro batches of task features for one rank, epoch after epoch.

    The order is a pure function of (seed, epoch): a seeded permutation per epoch. A step
    consumes one global batch (micro x accumulation x ranks) from the permutation; micro step
    ``m`` of rank ``r`` takes the slice ``m * ranks + r``. The state is the global position
    in the epoch (world-size independent); the last partial global batch of an epoch is dropped.
    """

    def __init__(self, features: Any, task: TaskKind, micro_batch_size: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, pad_id: int) -> None:
        self.rows = feature_rows(features)
        self.task, self.pad_id, self.seed = task, pad_id, seed
        self.micro, self.accum, self.rank, self.world = micro_batch_size, grad_accum, rank, world_size
        self.global_batch = micro_batch_size * grad_accum * world_size
        if len(self.rows) < self.global_batch:
            raise DataError(
                f"the training split has {len(self.rows)} examples (windows), fewer than one global "
                f"batch of {self.global_batch}; lower train.micro_batch_size or train.grad_accum_steps"
            )
        self.epoch, self.position = 0, 0

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm, perm_epoch = None, None
        while True:
            if self.position + self.global_batch > len(self.rows):
                self.epoch, self.position = self.epoch + 1, 0
            if perm_epoch != self.epoch:
                perm, perm_epoch = self._permutation(self.epoch), self.epoch
            start = self.position
            slices = [perm[start + (m * self.world + self.rank) * self.micro:][: self.micro]
                      for m in range(self.accum)]
            self.position += self.global_batch  # the state after this step, before it is yielded
            for idx in slices:
                yield self.task.collate([self.rows[i] for i in idx], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
