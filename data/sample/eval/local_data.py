"""Loads a bundled task's JSON Lines file from this folder (lm-evaluation-harness ``custom_dataset``).

A task YAML names it as ``custom_dataset: !function local_data.load`` with
``dataset_kwargs: {data_file: <file>.jsonl}``; the path is taken relative to this folder, so the
bundled tasks work from any working directory and offline. Your own task files can use the
harness's plain ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``.
"""

from pathlib import Path

import datasets


def load(data_file: str, split: str = "test", **_metadata):
    """A DatasetDict with the one split ``split`` read from ``data_file`` (relative to this folder)."""
    path = Path(__file__).resolve().parent / data_file
    return datasets.load_dataset("json", data_files={split: str(path)})
