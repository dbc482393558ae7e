"""Inference with a fine-tuned task model directory (``launcher/predict.py``)."""

from __future__ import annotations

import csv
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
from training.tasks.data import read_split, read_table
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


def read_lines(path: Path) -> list[str]:
    """The lines of a text file, blank ones included, split at ``\\n`` only (``\\r\\n`` too) so
    that line k is what ``sed -n kp`` shows; whitespace around each line is removed."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    return [line.strip() for line in lines]


def _table_layout(path: Path, cfg: TaskConfig) -> dict[str, Any]:
    """``columns``/``skip_header_row`` to read a CSV/TSV file to predict: a header row that
    names the text column is used as such; without one the rows have the recipe's
    ``task.columns``, with or without the label column."""
    with open(path, encoding="utf-8", newline="") as f:
        first = next(csv.reader(f, delimiter="\t" if cfg.format == "tsv" else ",",
                                quoting=csv.QUOTE_NONE if cfg.format == "tsv" else csv.QUOTE_MINIMAL), [])
    if not first or cfg.text_column in [cell.strip() for cell in first]:  # (read_table refuses an empty file)
        return {"columns": None, "skip_header_row": False}
    columns = cfg.columns or []
    unlabelled = [c for c in columns if c != cfg.label_column]
    for names in (columns, unlabelled):
        if names and len(first) == len(names):
            return {"columns": names, "skip_header_row": False}
    expected = f"or, without a header, the columns {columns} (the label column may be left out)" if columns else ""
    raise DataError(f"{path}: the first row {first[:5]} names no {cfg.text_column!r} column; give a header "
                    f"row naming the text column {cfg.text_column!r} {expected}".rstrip())


def read_inputs(path: Path, task: dict[str, Any]) -> datasets.Dataset:
    """Examples to predict, in order, in the task kind's schema; labels are optional and ignored.

    ``.txt``: one example per line (for NER one whitespace-tokenised sentence), blank lines
    included; ``.csv``/``.tsv`` (classification): a header row naming the text column, or the
    recipe's ``task.columns``; ``.jsonl``: the kind's fields; otherwise the recipe's format
    (CoNLL, SQuAD JSON). A blank line of a table is a row (its place is kept)."""
    if not path.is_file():
        raise DataError(f"--input {path} does not exist")
    kind = TASK_KINDS[task["kind"]]
    if path.suffix == ".txt":
        if not kind.plain_text:
            raise DataError(f"--input {path}: a {task['kind']} model cannot read plain text (.txt); give "
                            f"a {kind.prediction_format} file or JSON lines (.jsonl)")
        return kind(_task_config(task, "jsonl")).text_lines(read_lines(path))
    fmt = kind.prediction_formats.get(path.suffix) or kind.prediction_format or task.get("format", "tsv")
    cfg = _task_config(task, fmt)
    if fmt in ("conll", "squad"):
        return read_split(path, cfg)
    if fmt in ("csv", "tsv"):
        cfg = cfg.model_copy(update=_table_layout(path, cfg))
    return kind(cfg).view(read_table(path, cfg, keep_blank_lines=True), str(path), labelled=False)


def _batches(n: int, size: int) -> Iterator[range]:
    for i in range(0, n, size):
        yield range(i, min(i + size, n))


@torch.no_grad()
def predict(model_path: str | Path, input_path: str | Path, batch_size: int = 32) -> list[dict[str, Any]]:
    """One prediction record per input example (per line of a ``.txt`` file), in input order,
    of a task model (or the newest of a fine-tune run). A blank example keeps its place with
    ``"prediction": null, "empty": true`` (see :meth:`TaskKind.blank_record`)."""
    model_dir = find_model_dir(model_path)
    head, record = load_task_dir(model_dir)
    head.eval()
    tokenizer = load_tokenizer(model_dir)
    examples = read_inputs(Path(input_path), record)
    task = task_kind(_task_config(record, "jsonl"))
    labels, pad = record.get("labels") or [], record["pad_id"]
    blank = [task.blank(ex) for ex in examples]
    filled = examples.select([i for i, b in enumerate(blank) if not b])
    results: list[dict[str, Any]] = []
    if len(filled):
        batch = task.unlabelled(filled.to_dict(), labels, str(input_path))
        feats = task.featurize(batch, tokenizer, labels, record["eos_id"])
        rows = [dict(zip(feats, values)) for values in zip(*feats.values())]
        outputs: list[np.ndarray] = []
        for idx in _batches(len(rows), batch_size):
            micro = [rows[i] for i in idx]
            tokens, _ = task.collate(micro, pad)
            outputs += row_outputs(head(tokens).float().numpy(), micro)
        results = task.predict(outputs, rows, filled, labels)
    predicted = iter(results)
    return [task.blank_record(ex) if b else next(predicted) for ex, b in zip(examples, blank)]


def write_predictions(results: list[dict[str, Any]], output: str | Path | None) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if output is None:
        print(lines, end="")
    else:
        Path(output).write_text(lines, encoding="utf-8")
