"""What a fine-tune task kind does: one object per kind (see :mod:`training.tasks.registry`).

A task kind turns examples into token features, collates them into padded micro batches with
its targets, computes its loss as a (sum, count) pair so the loop can normalise per label over
padding, accumulation steps and ranks, builds its head, and turns model outputs back into
metrics and predictions. The fine-tune step, the data reader and ``predict`` only call these
methods; nothing outside the registry branches on the kind.

Every split of a task has one schema per kind (see each kind's module docstring).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, ClassVar

import datasets
import numpy as np
import torch

from training.tasks.config import TaskConfig
from training.tasks.labels import label_warnings

IGNORE = -100
"""Target of a position that carries no label (token classification)."""


class TaskKind(ABC):
    """One fine-tune task kind, configured by the ``task`` section."""

    kind: ClassVar[str]
    """The ``task.kind`` value this class implements."""
    prediction_formats: ClassVar[dict[str, str]] = {".jsonl": "jsonl"}
    """Format of a ``predict`` input by its file suffix (labels optional in every format) ..."""
    prediction_format: ClassVar[str | None] = None
    """... and of any other suffix (None: the recipe's ``task.format``)."""
    plain_text: ClassVar[bool] = True
    """``predict`` reads a ``.txt`` file as one example per line (:meth:`text_lines`)."""
    label_unit: ClassVar[str] = "examples"
    """What one label count counts (the label table at the start of fine-tuning)."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    # --------------------------------------------------------------------------- data
    def view(self, ds: datasets.Dataset, source: str, labelled: bool = True) -> datasets.Dataset:
        """The kind's uniform schema from a CSV/TSV/JSON-lines table (default: as read);
        ``labelled=False`` (examples to predict): the label columns may be missing."""
        return ds

    def label_map(self, train: datasets.Dataset) -> list[str]:
        """Index -> label name, from the training split (empty: no label set)."""
        return []

    def labels_in(self, ds: datasets.Dataset) -> set[str]:
        """The label names a split uses (checked against the training label map)."""
        return set()

    def label_counts(self, ds: datasets.Dataset) -> Counter[str]:
        """How often each label occurs in a split (in :attr:`label_unit`; empty: no label set)."""
        return Counter()

    def label_warnings(self, counts: Counter[str]) -> list[str]:
        """Training labels that look like typos (see :mod:`training.tasks.labels`)."""
        return label_warnings(counts)

    def text_lines(self, lines: list[str]) -> datasets.Dataset:
        """Examples from plain text, one per line (``predict`` on a ``.txt`` file)."""
        raise NotImplementedError(f"{self.kind} does not read plain text")

    def unlabelled(self, batch: dict[str, list], labels: list[str], source: str) -> dict[str, list]:
        """Fill the target columns of examples to predict with placeholders (any labels the
        input has are ignored), so :meth:`featurize` accepts them."""
        return batch

    def blank(self, example: dict[str, Any]) -> bool:
        """Whether an example to predict has no input at all (a blank line): ``predict`` keeps
        its place with :meth:`blank_record` instead of running the model on nothing."""
        return False

    def blank_record(self, example: dict[str, Any]) -> dict[str, Any]:
        """The prediction record of a :meth:`blank` example."""
        return {"prediction": None, "empty": True}

    # ----------------------------------------------------------------------- features
    @abstractmethod
    def featurize(self, batch: dict[str, list], tokenizer: Any, labels: list[str],
                  eos_id: int) -> dict[str, list]:
        """``datasets.map(batched=True)`` function: token ids and targets per row."""

    def feature_types(self) -> datasets.Features | None:
        """The Arrow types of :meth:`featurize`'s columns, or None to let ``datasets`` infer
        them. Given, ``datasets.map`` skips its type inference over every value, which for
        nested columns (QA's per-token offsets) costs more than the tokenisation itself."""
        return None

    def collate(self, rows: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (B, T) and the kind's targets."""
        width = max(len(r["input_ids"]) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        return tokens, self.targets(rows, width)

    @abstractmethod
    def targets(self, rows: list[dict], width: int) -> torch.Tensor:
        """The targets of a micro batch whose tokens are padded to ``width``."""

    # --------------------------------------------------------------------------- loss
    @abstractmethod
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed loss over the labels of a micro batch (normalised by the loop)."""

    @abstractmethod
    def label_count(self, target: torch.Tensor) -> int:
        """How many labels :meth:`loss` sums over, from the targets alone (before any forward)."""

    # --------------------------------------------------------------------------- head
    def num_labels(self, labels: list[str]) -> int:
        return len(labels) if labels else 1

    # --------------------------------------------------------------------- evaluation
    @abstractmethod
    def evaluate(self, outputs: list[np.ndarray], features: datasets.Dataset,
                 examples: datasets.Dataset, labels: list[str]) -> tuple[dict[str, float], list[dict]]:
        """Metrics of a labelled split and one prediction record per example."""

    @abstractmethod
    def predict(self, outputs: list[np.ndarray], features: list[dict],
                examples: datasets.Dataset, labels: list[str]) -> list[dict[str, Any]]:
        """One prediction record per example to predict (``launcher/predict.py``)."""


def row_outputs(logits: np.ndarray, rows: list[dict]) -> list[np.ndarray]:
    """Per-row model outputs of a micro batch: per-token outputs cut to each row's length."""
    if logits.ndim == 3:
        return [logits[j][: len(r["input_ids"])] for j, r in enumerate(rows)]
    return list(logits)
