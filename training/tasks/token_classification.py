"""Token classification (NER): word <-> sub-word alignment, features, seqeval metrics.

Schema: ``tokens`` (list[str]), ``tags`` (list[str], BIO/IOB). Words are joined with single spaces and tokenised once with offsets; each sub-word belongs to
the word that contains its last character. The label of a word sits on its first sub-word;
other sub-words get ``IGNORE`` (-100) so the loss counts each word once. Predictions are mapped
back to words through the same first sub-word; words cut off by ``max_length`` are predicted
``O`` and counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from crucible.errors import DataError
from training.tasks.base import IGNORE, TaskKind
from training.tasks.labels import bio_warnings


def word_spans(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The sentence text (words joined by one space) and each word's [start, end) characters."""
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), spans


def align(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int | None]:
    """Word index of every sub-word (``None`` for a sub-word that is only whitespace)."""
    owner: list[int | None] = []
    w = 0
    for start, end in offsets:
        if end <= start:
            owner.append(owner[-1] if owner else None)
            continue
        last = end - 1
        while w < len(spans) and spans[w][1] <= last:
            w += 1
        owner.append(w if w < len(spans) and spans[w][0] <= last else None)
    return owner


def first_subword_index(owner: list[int | None], n_words: int) -> list[int | None]:
    """Position of each word's first sub-word (``None`` when truncated away)."""
    first: list[int | None] = [None] * n_words
    for pos, w in enumerate(owner):
        if w is not None and first[w] is None:
            first[w] = pos
    return first


def featurize(batch: dict[str, list], tokenizer: Any, max_length: int, labels: list[str]) -> dict[str, list]:
    index = {name: i for i, name in enumerate(labels)}
    texts, spans = zip(*(word_spans(ws) for ws in batch["tokens"]))
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list] = {"input_ids": [], "target": [], "word_index": [], "truncated_words": []}
    for ids, offsets, sp, tags in zip(enc["input_ids"], enc["offset_mapping"], spans, batch["tags"]):
        ids, offsets = list(ids)[:max_length], list(offsets)[:max_length]
        owner = align(offsets, list(sp))
        first = first_subword_index(owner, len(sp))
        target = [IGNORE] * len(ids)
        for w, pos in enumerate(first):
            if pos is not None:
                target[pos] = index[tags[w]]
        out["input_ids"].append(ids)
        out["target"].append(target)
        out["word_index"].append([-1 if p is None else p for p in first])
        out["truncated_words"].append(sum(p is None for p in first))
    return out


def words_from_predictions(pred_ids: list[int], word_index: list[int], labels: list[str]) -> list[str]:
    """Map per-sub-word predicted label ids back to one tag per word."""
    return [labels[pred_ids[p]] if p >= 0 else "O" for p in word_index]


def compute_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, conlleval-compatible)."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "token_accuracy": float(accuracy_score(gold, pred)),
    }


class TokenClassificationTask(TaskKind):
    kind = "token_classification"
    prediction_format = "conll"
    label_unit = "words"

    def view(self, ds: datasets.Dataset, source: str, labelled: bool = True) -> datasets.Dataset:
        missing = [c for c in ("tokens", "tags")[: 2 if labelled else 1] if c not in ds.column_names]
        if missing:
            raise DataError(f"{source}: field(s) {missing} not found (the records have {ds.column_names}); "
                            "token classification JSON lines hold a 'tokens' list (and a 'tags' list "
                            "of one tag per token)")
        return ds

    def label_map(self, train: datasets.Dataset) -> list[str]:
        tags = {t for row in train["tags"] for t in row}
        # "O" first, then entity types grouped B/I, so ids are stable and readable
        return sorted(tags, key=lambda t: (t != "O", t[2:] if t[:2] in ("B-", "I-") else t, t))

    def labels_in(self, ds: datasets.Dataset) -> set[str]:
        return {t for row in ds["tags"] for t in row}

    def label_counts(self, ds: datasets.Dataset) -> Counter[str]:
        return Counter(t for row in ds["tags"] for t in row)

    def label_warnings(self, counts: Counter[str]) -> list[str]:
        return bio_warnings(counts)

    def text_lines(self, lines: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"tokens": [line.split() for line in lines]},
                                          features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string"))}))

    def unlabelled(self, batch: dict[str, list], labels: list[str], source: str) -> dict[str, list]:
        return {**batch, "tags": [[labels[0]] * len(t) for t in batch["tokens"]]}

    def blank(self, example: dict[str, Any]) -> bool:
        return not example["tokens"]

    def blank_record(self, example: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": [], "prediction": None, "empty": True}

    def featurize(self, batch: dict[str, list], tokenizer: Any, labels: list[str],
                  eos_id: int) -> dict[str, list]:
        return featurize(batch, tokenizer, self.cfg.max_length, labels)

    def targets(self, rows: list[dict], width: int) -> torch.Tensor:
        target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            target[i, : len(r["target"])] = torch.tensor(r["target"])
        return target

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                               reduction="sum")

    def label_count(self, target: torch.Tensor) -> int:
        return int((target != IGNORE).sum())

    def _tags(self, outputs: list[np.ndarray], word_index: list[list[int]], labels: list[str]) -> list[list[str]]:
        return [words_from_predictions(o.argmax(-1).tolist(), wi, labels) for o, wi in zip(outputs, word_index)]

    def evaluate(self, outputs: list[np.ndarray], features: datasets.Dataset,
                 examples: datasets.Dataset, labels: list[str]) -> tuple[dict[str, float], list[dict]]:
        pred_tags = self._tags(outputs, features["word_index"], labels)
        metrics = compute_metrics(examples["tags"], pred_tags)
        metrics["truncated_words"] = float(sum(features["truncated_words"]))
        preds = [{"tokens": ex["tokens"], "tags": ex["tags"], "prediction": p}
                 for ex, p in zip(examples, pred_tags)]
        return metrics, preds

    def predict(self, outputs: list[np.ndarray], features: list[dict],
                examples: datasets.Dataset, labels: list[str]) -> list[dict[str, Any]]:
        pred_tags = self._tags(outputs, [f["word_index"] for f in features], labels)
        return [{"tokens": ex["tokens"], "prediction": p} for ex, p in zip(examples, pred_tags)]
