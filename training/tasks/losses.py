"""Per-head losses as (sum, count), so the loop can normalise per label across padding,
gradient-accumulation steps and ranks (one division by the global count of the step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def head_loss(kind: str, logits: torch.Tensor, target: torch.Tensor, problem_type: str
              ) -> tuple[torch.Tensor, int]:
    """Summed loss over the labels of a micro batch, and how many labels it holds.

    - classification: cross-entropy per example (single label), BCE per (example, label)
      (multi label) or squared error per example (regression);
    - token_classification: cross-entropy per labelled sub-word (``IGNORE`` elsewhere);
    - qa: mean of start and end cross-entropy per window (target (B, 2)).
    """
    logits = logits.float()
    if kind == "classification":
        if problem_type == "regression":
            return F.mse_loss(logits[:, 0], target[:, 0], reduction="sum"), target.shape[0]
        if problem_type == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum"), target.numel()
        return F.cross_entropy(logits, target[:, 0].long(), reduction="sum"), target.shape[0]
    if kind == "token_classification":
        flat = target.flatten()
        return (F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=IGNORE, reduction="sum"),
                int((flat != IGNORE).sum()))
    if kind == "qa":
        start = F.cross_entropy(logits[..., 0], target[:, 0], reduction="sum")
        end = F.cross_entropy(logits[..., 1], target[:, 1], reduction="sum")
        return (start + end) / 2, target.shape[0]
    raise ValueError(f"unknown task kind {kind!r}")


def label_count(kind: str, target: torch.Tensor, problem_type: str) -> int:
    """How many labels ``head_loss`` will sum over, from the targets alone (before any forward)."""
    if kind == "token_classification":
        return int((target != IGNORE).sum())
    if kind == "classification" and problem_type == "multi_label":
        return target.numel()
    return target.shape[0]
