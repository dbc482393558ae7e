"""The step-module interface: what differs per workload, called by the training loop.

The loop (:class:`training.trainer.Trainer`) owns the run directory, resume, saving with the
completion marker, preemption, the non-finite step policy, the learning-rate schedule and the
metrics; it asks the step module, in this order:

1. :meth:`StepModule.prepare`: build the data and describe the model (config, sequence length,
   tokenizer) without an engine yet: resume planning needs the model identity first;
2. :meth:`StepModule.build_engine`: the DeepSpeed engine and optimizer from the loop's config;
3. per step: :meth:`StepModule.set_lr`, then :meth:`StepModule.train_step` over the micro batches
   the loop drew from the data;
4. :meth:`StepModule.evaluate` when an evaluation is due;
5. at a save: :meth:`StepModule.client_state` (added to the checkpoint) and
   :meth:`StepModule.save_model_dir` (what the model directory holds).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from crucible.config import Section, config_to_dict
from model.config import ModelConfig
from training.deepspeed_config import BatchPlan


class ResumableData(Protocol):
    """The training data of a step module: micro batches forever, with a JSON state."""

    def __iter__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepOutput:
    """This rank's part of one optimizer step; the loop sums every field over the ranks.

    The step's loss is ``sum(loss_sum) / sum(loss_count)`` over ranks: a mean per token for
    language modelling, per label for task heads.
    """

    loss_sum: float | torch.Tensor
    """This rank's summed loss (best a 0-d tensor on the device: read once, by the loop)."""
    loss_count: float | torch.Tensor
    tokens: int
    """Tokens this rank trained on in the step (for tokens/s and ``consumed_tokens``)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further metrics of this step, logged as they are (not reduced)."""


class StepModule(ABC):
    """One workload: language modelling, a task head, ... (see the module docstring)."""

    model_cfg: ModelConfig
    """The model's resolved config (its identity is checked on resume)."""
    seq_len: int
    """Tokens per sequence (for FLOPs per token)."""
    run_config: Section
    """The resolved config written to the run directory and into every checkpoint."""
    tokenizer_dir: Path | None = None
    """Tokenizer files copied into the run directory."""
    tokenizer_sha256: str | None = None
    """Checked on resume when known."""
    engine: Any = None
    optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def prepare(self, plan: BatchPlan) -> ResumableData:
        """Build the training data and everything the engine does not need yet."""

    @abstractmethod
    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
        """Build the model, optimizer and DeepSpeed engine (kept as ``engine``/``optimizer``)."""

    def set_lr(self, step: int, lr: float) -> None:
        """Set the learning rate the loop's schedule gives for optimizer step ``step``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @abstractmethod
    def train_step(self, batch: list[Any], step: int) -> StepOutput:
        """Forward, backward and ``engine.step()`` over the micro batches of one optimizer step."""

    @abstractmethod
    def evaluate(self) -> dict[str, float] | None:
        """Evaluation metrics (same on every rank), or None when there is nothing to evaluate."""

    def evaluate_full(self) -> dict[str, float] | None:
        """The end-of-run evaluation over all of the evaluation data (same on every rank), or None
        when the workload has none beyond :meth:`evaluate` (the default)."""
        return None

    def client_state(self) -> dict[str, Any]:
        """What this workload adds to a checkpoint's client state."""
        return {"model_config": config_to_dict(self.model_cfg),
                "tokenizer_sha256": self.tokenizer_sha256, "manifest_sha256s": []}

    @abstractmethod
    def save_model_dir(self, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Write a model directory (rank 0): with ``state_dict`` None, every file but the weights
        (the checkpoint's ``model_files/``, which consolidation completes from the shards)."""
