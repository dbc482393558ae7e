"""Sequence classification: features, metrics.

Input layout: ``text [EOS text_pair] EOS``, right-padded with the pad id; the head pools the
last non-pad token (the final EOS), like Hugging Face ``LlamaForSequenceClassification``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.tasks.config import TaskConfig


def featurize(batch: dict[str, list], tokenizer: Any, cfg: TaskConfig, labels: list[str],
              eos_id: int) -> dict[str, list]:
    """``datasets.map(batched=True)`` function: token ids and the label target per example."""
    enc = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    pair = (tokenizer(batch["text_pair"], add_special_tokens=False)["input_ids"]
            if cfg.text_pair_column else [None] * len(enc))
    index = {name: i for i, name in enumerate(labels)}
    input_ids, targets, truncated = [], [], []
    for ids, pair_ids, label in zip(enc, pair, batch["label"]):
        seq = list(ids) + ([eos_id] + list(pair_ids) if pair_ids is not None else [])
        truncated.append(len(seq) + 1 > cfg.max_length)
        input_ids.append(seq[: cfg.max_length - 1] + [eos_id])
        if cfg.problem_type == "regression":
            targets.append([float(label)])
        elif cfg.problem_type == "multi_label":
            vec = [0.0] * len(labels)
            for name in label:
                vec[index[name]] = 1.0
            targets.append(vec)
        else:
            targets.append([float(index[label])])
    return {"input_ids": input_ids, "target": targets, "truncated": truncated}


def compute_metrics(logits: np.ndarray, targets: np.ndarray, cfg: TaskConfig,
                    labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (single/multi-label, via scikit-learn); MSE and Pearson r (regression)."""
    from sklearn.metrics import accuracy_score, f1_score

    if cfg.problem_type == "regression":
        pred, gold = logits[:, 0], targets[:, 0]
        r = float(np.corrcoef(pred, gold)[0, 1]) if len(gold) > 1 and gold.std() > 0 else 0.0
        return {"mse": float(np.mean((pred - gold) ** 2)), "pearson": r}
    if cfg.problem_type == "multi_label":
        pred = (logits > 0).astype(int)
        gold = targets.astype(int)
        return {
            "exact_match": float(accuracy_score(gold, pred)),
            "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        }
    pred = logits.argmax(-1)
    gold = targets[:, 0].astype(int)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", labels=list(range(len(labels))),
                                   zero_division=0)),
    }


def majority_rate(targets: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class (the baseline to beat)."""
    _, counts = np.unique(targets[:, 0].astype(int), return_counts=True)
    return float(counts.max() / counts.sum())
