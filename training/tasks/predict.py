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
from model.io import find_model_dir
from model.task_io import load_task_dir
from training.tasks.base import row_outputs
from training.tasks.config import TaskConfig
from training.tasks.data import read_split
from training.tasks.features import load_tokenizer
from training.tasks.registry import TASK_KINDS, task_kind


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
    kind = TASK_KINDS[task["kind"]]
    if path.suffix == ".txt" and kind.plain_text:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return kind(_task_config(task, "jsonl")).text_lines(lines)
    fmt = "jsonl" if path.suffix == ".jsonl" else kind.prediction_format or task.get("format", "tsv")
    cfg = _task_config(task, fmt)
    try:
        return read_split(path, cfg)
    except DataError:
        if kind.prediction_format is not None:
            raise
        # a table in the recipe's format without the label column: read the text column only
        ds = datasets.load_dataset("json" if fmt == "jsonl" else "csv", data_files=str(path), split="train",
                                   **({} if fmt == "jsonl" else {"delimiter": "\t" if fmt == "tsv" else ",",
                                                                  "column_names": cfg.columns}))
        return ds.select_columns([cfg.text_column]).rename_column(cfg.text_column, "text")


def _batches(n: int, size: int) -> Iterator[range]:
    for i in range(0, n, size):
        yield range(i, min(i + size, n))


@torch.no_grad()
def predict(model_path: str | Path, input_path: str | Path, batch_size: int = 32) -> list[dict[str, Any]]:
    """One prediction record per input example of a task model (or the newest of a fine-tune run)."""
    model_dir = find_model_dir(model_path)
    head, record = load_task_dir(model_dir)
    head.eval()
    tokenizer = load_tokenizer(model_dir)
    examples = read_inputs(Path(input_path), record)
    task = task_kind(_task_config(record, "jsonl"))
    labels, pad = record.get("labels") or [], record["pad_id"]
    batch = task.unlabelled(examples.to_dict(), labels, str(input_path))
    feats = task.featurize(batch, tokenizer, labels, record["eos_id"])
    rows = [dict(zip(feats, values)) for values in zip(*feats.values())]
    outputs: list[np.ndarray] = []
    for idx in _batches(len(rows), batch_size):
        micro = [rows[i] for i in idx]
        tokens, _ = task.collate(micro, pad)
        outputs += row_outputs(head(tokens).float().numpy(), micro)
    return task.predict(outputs, rows, examples, labels)


def write_predictions(results: list[dict[str, Any]], output: str | Path | None) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if output is None:
        print(lines, end="")
    else:
        Path(output).write_text(lines, encoding="utf-8")
