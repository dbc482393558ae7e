"""Sequence classification: single label (cross-entropy), multi-label (BCE), regression (MSE).

Schema: ``text``, optional ``text_pair``, ``label`` (str; list[str] for multi-label; float for
regression). Input layout: ``text [EOS text_pair] EOS``, right-padded with the pad id; the head
pools the last non-pad token (the final EOS), like Hugging Face ``LlamaForSequenceClassification``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from crucible.errors import DataError
from training.tasks.base import TaskKind
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


class ClassificationTask(TaskKind):
    kind = "classification"
    prediction_formats: ClassVar[dict[str, str]] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}

    def view(self, ds: datasets.Dataset, source: str, labelled: bool = True) -> datasets.Dataset:
        cfg = self.cfg
        texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
        needed = texts + ([cfg.label_column] if labelled else [])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{source}: column(s) {missing} not found; the file has columns {ds.column_names} "
                "(set task.text_column / task.label_column / task.text_pair_column, or task.columns "
                "for a file without a header row)"
            )
        placeholder: Any = {"regression": 0.0, "multi_label": []}.get(cfg.problem_type, "")

        def text(value: Any) -> str:
            return "" if value is None else str(value).strip()

        def convert(row: dict, index: int) -> dict:
            value: Any = placeholder
            if labelled:  # examples to predict: a label column is ignored
                value = self._label_value(row[cfg.label_column], f"{source}: example {index + 1}")
            out = {"text": text(row[cfg.text_column]), "label": value}
            if cfg.text_pair_column:
                out["text_pair"] = text(row[cfg.text_pair_column])
            return out

        label_type = {"regression": datasets.Value("float64"),
                      "multi_label": datasets.Sequence(datasets.Value("string"))}.get(
            cfg.problem_type, datasets.Value("string"))
        features = {"text": datasets.Value("string"), "label": label_type}
        if cfg.text_pair_column:
            features["text_pair"] = datasets.Value("string")
        return ds.map(convert, with_indices=True, remove_columns=ds.column_names,
                      features=datasets.Features(features))

    def _label_value(self, label: Any, where: str) -> Any:
        """The label of a training/dev/test row in the schema's type; an empty one is an error
        (it would become a class, or a regression target, of its own)."""
        cfg = self.cfg
        if cfg.problem_type == "multi_label":  # an empty cell: no label applies
            return sorted({x.strip() for x in str(label or "").split(cfg.label_separator) if x.strip()})
        if label is None or not str(label).strip():
            raise DataError(f"{where} has an empty {cfg.label_column!r}; give every training, dev and test "
                            "example a label (or predict unlabelled examples with launcher/predict.py)")
        if cfg.problem_type == "regression":
            try:
                return float(label)
            except ValueError:
                raise DataError(f"{where}: {cfg.label_column!r} is {label!r}, not a number "
                                "(task.problem_type=regression)") from None
        return str(label).strip()

    def label_map(self, train: datasets.Dataset) -> list[str]:
        if self.cfg.problem_type == "regression":
            return []
        if self.cfg.problem_type == "multi_label":
            return sorted({label for row in train["label"] for label in row})
        return sorted(set(train["label"]), key=lambda x: (len(x), x) if x.lstrip("-").isdigit() else (10**9, x))

    def labels_in(self, ds: datasets.Dataset) -> set[str]:
        if self.cfg.problem_type == "multi_label":
            return {label for row in ds["label"] for label in row}
        return set(ds["label"])

    def label_counts(self, ds: datasets.Dataset) -> Counter[str]:
        if self.cfg.problem_type == "regression":
            return Counter()
        if self.cfg.problem_type == "multi_label":
            return Counter(label for row in ds["label"] for label in row)
        return Counter(ds["label"])

    def text_lines(self, lines: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": lines})

    def unlabelled(self, batch: dict[str, list], labels: list[str], source: str) -> dict[str, list]:
        if self.cfg.text_pair_column and "text_pair" not in batch:
            raise DataError(f"{source}: the model classifies text pairs; give a {self.cfg.text_pair_column} column")
        placeholder: Any = {"regression": 0.0, "multi_label": []}.get(self.cfg.problem_type, labels[0] if labels else "")
        return {**batch, "label": [placeholder] * len(batch["text"])}

    def blank(self, example: dict[str, Any]) -> bool:
        return not example["text"].strip() and not (example.get("text_pair") or "").strip()

    def blank_record(self, example: dict[str, Any]) -> dict[str, Any]:
        return {"text": example["text"], "prediction": None, "empty": True}

    def featurize(self, batch: dict[str, list], tokenizer: Any, labels: list[str],
                  eos_id: int) -> dict[str, list]:
        return featurize(batch, tokenizer, self.cfg, labels, eos_id)

    def targets(self, rows: list[dict], width: int) -> torch.Tensor:
        return torch.tensor([r["target"] for r in rows], dtype=torch.float32)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.cfg.problem_type == "regression":
            return F.mse_loss(logits[:, 0], target[:, 0], reduction="sum")
        if self.cfg.problem_type == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        return F.cross_entropy(logits, target[:, 0].long(), reduction="sum")

    def label_count(self, target: torch.Tensor) -> int:
        return target.numel() if self.cfg.problem_type == "multi_label" else target.shape[0]

    def evaluate(self, outputs: list[np.ndarray], features: datasets.Dataset,
                 examples: datasets.Dataset, labels: list[str]) -> tuple[dict[str, float], list[dict]]:
        logits = np.stack(outputs)
        targets = np.asarray(features["target"], dtype=np.float32)
        metrics = compute_metrics(logits, targets, self.cfg, labels)
        if self.cfg.problem_type == "single_label":
            metrics["majority_rate"] = majority_rate(targets)
            preds = [{"text": ex["text"], "label": ex["label"], "prediction": labels[int(p)]}
                     for ex, p in zip(examples, logits.argmax(-1))]
        else:
            preds = [{"text": ex["text"], "label": ex["label"], "output": o.tolist()}
                     for ex, o in zip(examples, logits)]
        return metrics, preds

    def predict(self, outputs: list[np.ndarray], features: list[dict],
                examples: datasets.Dataset, labels: list[str]) -> list[dict[str, Any]]:
        results = []
        for ex, out in zip(examples, outputs):
            rec: dict[str, Any] = {"text": ex["text"]}
            if self.cfg.problem_type == "single_label":
                probs = torch.softmax(torch.from_numpy(out), -1).numpy()
                rec.update(prediction=labels[int(out.argmax())], probability=float(probs.max()))
            elif self.cfg.problem_type == "multi_label":
                rec["prediction"] = [labels[i] for i in np.flatnonzero(out > 0)]
            else:
                rec["prediction"] = float(out[0])
            results.append(rec)
        return results
