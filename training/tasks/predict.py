"""Inference with a fine-tuned task model directory (``launcher/predict.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from crucible.errors import DataError
from training.tasks import classification, qa, token_classification
from training.tasks.config import TaskConfig
from training.tasks.data import read_split


def _task_config(task: dict[str, Any], fmt: str) -> TaskConfig:
    return TaskConfig(
        kind=task["kind"], format=fmt, columns=task.get("columns"),
        text_column=task.get("text_column") or "text", text_pair_column=task.get("text_pair_column"),
        label_column=task.get("label_column") or "label", problem_type=task.get("problem_type", "single_label"),
        max_length=task["max_length"], doc_stride=task.get("doc_stride", 32),
        max_answer_length=task.get("max_answer_length", 30), n_best=task.get("n_best", 20),
    )


def read_inputs(path: Path, task: dict[str, Any]) -> datasets.Dataset:
    """Examples to predict: the task's own training format, or plain text (``.txt``: one text
    per line; for NER one whitespace-tokenised sentence per line); labels are optional."""
    if not path.is_file():
        raise DataError(f"--input {path} does not exist")
    kind = task["kind"]
    if path.suffix == ".txt" and kind != "qa":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if kind == "classification":
            return datasets.Dataset.from_dict({"text": lines})
        return datasets.Dataset.from_dict({"tokens": [line.split() for line in lines]})
    fmt = {"classification": task.get("format", "tsv"), "token_classification": "conll", "qa": "squad"}[kind]
    if path.suffix == ".jsonl":
        fmt = "jsonl"
    cfg = _task_config(task, fmt)
    if kind == "classification" and fmt in ("tsv", "csv", "jsonl"):
        try:
            return read_split(path, cfg)
        except DataError:
            # no label column: read the text column only
            ds = datasets.load_dataset("json" if fmt == "jsonl" else "csv", data_files=str(path), split="train",
                                       **({} if fmt == "jsonl" else {"delimiter": "\t" if fmt == "tsv" else ",",
                                                                      "column_names": cfg.columns}))
            return ds.select_columns([cfg.text_column]).rename_column(cfg.text_column, "text")
    return read_split(path, cfg)


def _batches(n: int, size: int) -> Iterator[range]:
    for i in range(0, n, size):
        yield range(i, min(i + size, n))


@torch.no_grad()
def predict(model_path: str | Path, input_path: str | Path, batch_size: int = 32) -> list[dict[str, Any]]:
    from model.io import find_model_dir
    from model.task_io import load_task_dir
    from training.finetune import collate, load_tokenizer

    model_dir = find_model_dir(model_path)
    head, task = load_task_dir(model_dir)
    head.eval()
    tokenizer = load_tokenizer(model_dir)
    examples = read_inputs(Path(input_path), task)
    kind, labels, pad = task["kind"], task.get("labels") or [], task["pad_id"]
    cfg = _task_config(task, "jsonl")
    batch = examples.to_dict()
    if kind == "classification":
        if "label" not in batch:
            batch["label"] = [labels[0] if labels else 0.0] * len(examples)
        if cfg.text_pair_column and "text_pair" not in batch:
            raise DataError(f"{input_path}: the model classifies text pairs; give a text_pair column")
        feats = classification.featurize(batch, tokenizer, cfg, labels, task["eos_id"])
    elif kind == "token_classification":
        batch.setdefault("tags", [["O"] * len(t) for t in batch["tokens"]])
        known = set(labels)
        batch["tags"] = [[t if t in known else labels[0] for t in row] for row in batch["tags"]]
        feats = token_classification.featurize(batch, tokenizer, cfg.max_length, labels)
    else:
        feats = qa.featurize(batch, tokenizer, cfg.max_length, cfg.doc_stride, task["eos_id"])
    rows = [dict(zip(feats, values)) for values in zip(*feats.values())]
    outputs: list[np.ndarray] = []
    for idx in _batches(len(rows), batch_size):
        tokens, _ = collate([rows[i] for i in idx], kind, pad)
        logits = head(tokens).float().numpy()
        outputs += [logits[j][: len(rows[i]["input_ids"])] if logits.ndim == 3 else logits[j]
                    for j, i in enumerate(idx)]
    results: list[dict[str, Any]] = []
    if kind == "classification":
        for ex, out in zip(examples, outputs):
            rec = {"text": ex["text"]}
            if cfg.problem_type == "single_label":
                probs = torch.softmax(torch.from_numpy(out), -1).numpy()
                rec.update(prediction=labels[int(out.argmax())], probability=float(probs.max()))
            elif cfg.problem_type == "multi_label":
                rec["prediction"] = [labels[i] for i in np.flatnonzero(out > 0)]
            else:
                rec["prediction"] = float(out[0])
            results.append(rec)
    elif kind == "token_classification":
        for ex, out, f in zip(examples, outputs, rows):
            tags = token_classification.words_from_predictions(out.argmax(-1).tolist(), f["word_index"], labels)
            results.append({"tokens": ex["tokens"], "prediction": tags})
    else:
        contexts = {ex["id"]: ex["context"] for ex in examples}
        answers = qa.decode_answers([o[:, 0] for o in outputs], [o[:, 1] for o in outputs], rows,
                                    contexts, cfg.n_best, cfg.max_answer_length)
        results = [{"id": ex["id"], "question": ex["question"], "prediction": answers.get(ex["id"], "")}
                   for ex in examples]
    return results


def write_predictions(results: list[dict[str, Any]], output: str | Path | None) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if output is None:
        print(lines, end="")
    else:
        Path(output).write_text(lines, encoding="utf-8")
