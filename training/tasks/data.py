"""Fine-tune data through ``datasets``: CSV/TSV, JSON lines, CoNLL columns, SQuAD JSON.

Every split becomes a ``datasets.Dataset`` in its task kind's schema (see the kinds' modules:
:mod:`training.tasks.classification`, :mod:`~training.tasks.token_classification`,
:mod:`~training.tasks.qa`).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from crucible.errors import DataError
from training.tasks.base import TaskKind
from training.tasks.config import TaskConfig
from training.tasks.registry import task_kind

SPLITS = ("train", "dev", "test")


@dataclass
class TaskData:
    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset
    labels: list[str] = field(default_factory=list)
    """Index -> label name (classification and NER); empty for regression and QA."""
    sources: dict[str, str] = field(default_factory=dict)
    """Split -> file it came from (for messages and the run record)."""

    def split(self, name: str) -> datasets.Dataset:
        return getattr(self, name)


def _require_file(path: str | None, what: str) -> Path:
    if not path:
        raise DataError(f"task.{what} is not set: give the path of the {what} file")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"task.{what} file {p} does not exist")
    return p


def read_conll(path: Path, token_col: int = 0, tag_col: int = -1) -> datasets.Dataset:
    """Sentences separated by blank lines; one token per line with whitespace-separated columns."""
    sentences: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags})
                    tokens, tags = [], []
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) < 2:
                raise DataError(
                    f"{path}:{lineno}: expected a word and a tag separated by a tab or space, got {line!r}"
                )
            tokens.append(cols[token_col])
            tags.append(cols[tag_col].strip())
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise DataError(f"{path} holds no sentences: a CoNLL file has one word and its tag per line, "
                        "and a blank line between sentences")
    return datasets.Dataset.from_list(sentences, features=datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("string")),
         "tags": datasets.Sequence(datasets.Value("string"))}))


def read_squad(path: Path) -> datasets.Dataset:
    """SQuAD v1.1 JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not SQuAD JSON with a top-level 'data' list: {exc}") from None
    rows = []
    for article in data:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                rows.append({
                    "id": str(qa["id"]), "title": article.get("title", ""),
                    "context": para["context"], "question": qa["question"],
                    "answers": {"text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers]},
                })
    if not rows:
        raise DataError(f"{path} holds no questions: SQuAD JSON is {{\"data\": [{{\"paragraphs\": "
                        "[{\"context\": ..., \"qas\": [...]}]}]}")
    return datasets.Dataset.from_list(rows)


def _has_content(path: Path) -> bool:
    """Whether the file holds anything but whitespace (reads only up to the first such byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _cause(exc: BaseException) -> str:
    """The first cause under ``datasets``' generic wrapper ("An error occurred while generating
    the dataset"), which names nothing."""
    from datasets.exceptions import DatasetGenerationError

    seen: BaseException | None = exc
    while isinstance(seen, DatasetGenerationError):
        seen = seen.__cause__ or seen.__context__
    seen = seen or exc
    return f"{type(seen).__name__}: {seen}".splitlines()[0]


def _check_first_row_width(path: Path, cfg: TaskConfig) -> None:
    """pandas silently turns the leading fields of a first row wider than the header into an
    index (``good, fun film,pos`` under ``text,label`` reads as text " fun film"); later wide
    rows are parse errors anyway."""
    delimiter = "\t" if cfg.format == "tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if cfg.format == "tsv" else csv.QUOTE_MINIMAL)
        rows = [row for row in itertools.islice(reader, 50) if row][:2]
    width = len(cfg.columns) if cfg.columns else len(rows[0]) if rows else 0
    first = rows[0] if cfg.columns and not cfg.skip_header_row else rows[1] if len(rows) > 1 else None
    if first is not None and len(first) > width:
        quote = "quote the text (\"...\")" if cfg.format == "csv" else "remove the tab from the text"
        raise DataError(f"{path}: the first example has {len(first)} fields but "
                        f"{'task.columns has' if cfg.columns else 'the header row has'} {width}: a "
                        f"{'comma' if cfg.format == 'csv' else 'tab'} inside a field? {quote}")


def read_table(path: Path, cfg: TaskConfig, keep_blank_lines: bool = False) -> datasets.Dataset:
    """A CSV/TSV/JSON-lines file as ``datasets`` reads it (columns as in the file, or
    ``cfg.columns``); an empty file, or one with a header row only, is a :class:`DataError`.
    ``keep_blank_lines``: a blank line of a CSV/TSV file is a row of empty cells (examples to
    predict keep their places) instead of being skipped."""
    what = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON lines"}.get(cfg.format, cfg.format)
    layout = ("a header row (or task.columns) and one example per row" if cfg.format in ("tsv", "csv")
              else "one JSON object per line")
    if not _has_content(path):
        size = path.stat().st_size
        raise DataError(f"{path} is empty ({'0 bytes' if size == 0 else 'only blank lines'}): a {what} "
                        f"file of task examples needs {layout}")
    kwargs: dict[str, Any] = {}
    if cfg.format in ("tsv", "csv"):
        _check_first_row_width(path, cfg)
        kwargs = {"delimiter": "\t" if cfg.format == "tsv" else ",", "keep_default_na": False}
        if cfg.format == "tsv":
            kwargs["quoting"] = csv.QUOTE_NONE
        if keep_blank_lines:
            kwargs["skip_blank_lines"] = False
        if cfg.columns:
            kwargs["column_names"] = cfg.columns
            if cfg.skip_header_row:
                kwargs["skiprows"] = 1
        builder = "csv"
    else:
        builder = "json"
    try:
        ds = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as exc:  # datasets raises many kinds for malformed files
        if "corresponds to no data" not in str(exc):
            raise DataError(f"could not read {path} as {what}: {_cause(exc)}") from None
        ds = None
    if ds is None or len(ds) == 0:
        found = "a header row but no examples" if builder == "csv" else "no examples"
        raise DataError(f"{path} has {found}: a {what} file of task examples needs {layout}")
    return ds


def read_split(path: Path, cfg: TaskConfig) -> datasets.Dataset:
    """One file in the task kind's schema (CoNLL and SQuAD files are read in it directly)."""
    if cfg.format == "conll":
        return read_conll(path, cfg.conll_token_column, cfg.conll_tag_column)
    if cfg.format == "squad":
        return read_squad(path)
    return task_kind(cfg).view(read_table(path, cfg), str(path))


def _bucket(example: dict) -> float:
    """Stable position in [0, 1) from the example's content (never Python's hash()); QA
    examples hash their context only, so questions on one paragraph stay in one split."""
    content = example["context"] if "context" in example else example
    key = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def hash_split(ds: datasets.Dataset, dev_fraction: float, test_fraction: float) -> dict[str, datasets.Dataset]:
    """Split one file into train/dev/test by a content hash: stable across runs and machines."""
    buckets = [_bucket(ex) for ex in ds]
    dev_idx = [i for i, b in enumerate(buckets) if b < dev_fraction]
    test_idx = [i for i, b in enumerate(buckets) if dev_fraction <= b < dev_fraction + test_fraction]
    train_idx = [i for i, b in enumerate(buckets) if b >= dev_fraction + test_fraction]
    return {"train": ds.select(train_idx), "dev": ds.select(dev_idx), "test": ds.select(test_idx)}


def _check_labels(ds: datasets.Dataset, split: str, labels: list[str], task: TaskKind, source: str) -> None:
    if not labels:
        return
    unseen = sorted(task.labels_in(ds) - set(labels))
    if unseen:
        raise DataError(
            f"{split} split ({source}) has label(s) {unseen[:10]} that never occur in the training "
            f"data (known: {labels[:20]}); fix the labels or add training examples for them"
        )


def load_task_data(cfg: TaskConfig) -> TaskData:
    """Read train/dev/test, split off dev/test by hash when missing, build and check the label map."""
    train_files = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    paths = [_require_file(f, "train") for f in train_files]
    train_path = ", ".join(str(p) for p in paths)
    sources = {"train": train_path}
    parts = [read_split(p, cfg) for p in paths]
    train = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    splits: dict[str, datasets.Dataset] = {"train": train}
    if cfg.dev is None or cfg.test is None:
        parts = hash_split(train, *cfg.split_fractions)
        splits["train"] = parts["train"]
        for name in ("dev", "test"):
            if getattr(cfg, name) is None:
                splits[name] = parts[name]
                sources[name] = f"{train_path} (hash split)"
    for name in ("dev", "test"):
        if name not in splits:
            path = _require_file(getattr(cfg, name), name)
            splits[name] = read_split(path, cfg)
            sources[name] = str(path)
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise DataError(f"the {name} split ({sources[name]}) is empty")
    task = task_kind(cfg)
    labels = task.label_map(splits["train"])
    for name in ("dev", "test"):
        _check_labels(splits[name], name, labels, task, sources[name])
    return TaskData(splits["train"], splits["dev"], splits["test"], labels, sources)
