"""Fine-tune task configuration (section ``task``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crucible.config import Section
from training.config import CheckpointConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig


class TaskConfig(Section):
    """Fine-tune task: head, data files and columns, sequence limits (section ``task``)."""

    kind: Literal["classification", "token_classification", "qa"] = "classification"
    """Head: sequence classification, token classification (NER) or extractive QA."""
    format: Literal["csv", "tsv", "jsonl", "conll", "squad"] = "tsv"
    """File format of train/dev/test (tsv/csv need a header row unless `columns` is set)."""
    train: str | list[str] | None = None
    """Training file, or a list of files read one after another."""
    dev: str | None = None
    """Development file (evaluated every train.eval_every steps); null: split from train."""
    test: str | None = None
    """Test file (evaluated at the end); null: split from train."""
    split_fractions: tuple[float, float] = (0.1, 0.1)
    """(dev, test) fractions split off the training file by a hash of each example when dev/test are null."""
    columns: list[str] | None = None
    """Column names of a csv/tsv file without a header row (or replacing it, with skip_header_row)."""
    skip_header_row: bool = False
    """With `columns`: the files do have a header row; skip it (for files whose headers differ)."""
    text_column: str = "text"
    """Column with the text (classification)."""
    text_pair_column: str | None = None
    """Second text column for pair classification (null: single text)."""
    label_column: str = "label"
    """Label column (classification)."""
    problem_type: Literal["single_label", "multi_label", "regression"] = "single_label"
    """single_label: cross-entropy; multi_label: BCE over labels separated by label_separator; regression: MSE."""
    label_separator: str = ","
    """Separator of several labels in one cell (multi_label)."""
    conll_token_column: int = 0
    """CoNLL: column index of the word."""
    conll_tag_column: int = -1
    """CoNLL: column index of the BIO/IOB tag."""
    max_length: int = Field(128, gt=8)
    """Longest input in tokens (classification and NER truncate; QA windows)."""
    doc_stride: int = Field(32, gt=0)
    """QA: tokens of overlap between consecutive windows over a long context."""
    max_answer_length: int = Field(30, gt=0)
    """QA: longest answer span in tokens."""
    n_best: int = Field(20, gt=0)
    """QA: start/end candidates considered per window."""
    freeze_backbone_steps: int = Field(0, ge=0)
    """Train only the new head for the first N steps."""
    head_lr_multiplier: float = Field(1.0, gt=0)
    """Learning rate of the new head relative to optim.lr."""
    contamination_ngram: int = Field(13, gt=1)
    """n (in tokens) of the n-gram overlap check between evaluation sets and pretraining shards."""

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        formats = {
            "classification": ("csv", "tsv", "jsonl"),
            "token_classification": ("conll", "jsonl"),
            "qa": ("squad", "jsonl"),
        }[self.kind]
        if self.format not in formats:
            raise ValueError(
                f"task.format={self.format} does not fit task.kind={self.kind}; use one of {formats}"
            )
        if self.kind == "qa" and self.doc_stride >= self.max_length:
            raise ValueError(
                f"task.doc_stride ({self.doc_stride}) must be below task.max_length ({self.max_length})"
            )
        if not all(0 <= f < 1 for f in self.split_fractions) or sum(self.split_fractions) >= 1:
            raise ValueError(f"task.split_fractions must be two fractions summing below 1, got {self.split_fractions}")
        return self


class FinetuneConfig(Section):
    """Root config of ``launcher/finetune.py`` (and ``launcher/lr_find.py``)."""

    init_from: str | None = None
    """Pretraining run directory, model directory or Hugging Face Llama directory to start from."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: load the backbone weights; random: same architecture and tokenizer, fresh weights (baseline)."""
    run_dir: str = "runs/finetune"
    """Run directory: checkpoints, logs, TensorBoard, metrics.json, predictions, task model directories."""
    contamination_manifests: list[str] | None = None
    """Pretraining manifest.json files for the contamination check (null: those of the init_from run, if known)."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.01))
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(kind="linear", min_lr_ratio=0.0))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(eval_every=0))
    checkpoint: CheckpointConfig = Field(default_factory=lambda: CheckpointConfig(every=0, keep_last=1))
    log: LogConfig = Field(default_factory=LogConfig)
