"""Task model directories and their Hugging Face export.

A task model directory is a model directory (the fine-tuned backbone: ``model.safetensors`` or shards,
``model_config.json``, tokenizer files, provenance) plus::

    head.safetensors   the head's own parameters (``score.*`` or ``qa_outputs.*``)
    task.json          kind, labels, problem type, pad/eos ids and input limits

Export writes the matching Hugging Face class (``LlamaForSequenceClassification``,
``LlamaForTokenClassification``, ``LlamaForQuestionAnswering``) with equal logits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from crucible.errors import DataError
from crucible.fileio import atomic_path, atomic_write_json
from model.config import ModelConfig
from model.convert import write_hf_tokenizer
from model.heads import TaskHead, build_head, head_class
from model.hf_mapping import to_hf_config, to_hf_state_dict
from model.io import (
    DEFAULT_MAX_SHARD_BYTES,
    HEAD_FILE,
    HF_CONFIG_FILE,
    HF_WEIGHTS_FILE,
    TASK_FILE,
    Weights,
    load_weights,
    model_from_state_dict,
    read_model_config,
    save_model_dir,
    write_task_weights,
)


def split_head_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(backbone state with our names, head state) from a head module's state dict."""
    backbone = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    head = {k: v for k, v in state_dict.items() if not k.startswith("model.")}
    return backbone, head


def save_task_dir(path: str | Path, state_dict: Weights | None, cfg: ModelConfig,
                  task: dict[str, Any], tokenizer_dir: str | Path | None = None,
                  provenance: dict[str, Any] | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a task model directory (:func:`write_task_weights`; ``state_dict`` None: every file
    but the weights)."""
    out = Path(path)
    save_model_dir(out, None, cfg, tokenizer_dir=tokenizer_dir, provenance=provenance)
    if state_dict is not None:
        write_task_weights(out, state_dict, cfg, max_shard_bytes)
    atomic_write_json(out / TASK_FILE, task, indent=2, sort_keys=True)
    return out


def read_task(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TASK_FILE
    if not file.is_file():
        raise DataError(f"{path} is not a task model directory (no {TASK_FILE}); pass the model "
                        "directory written by launcher/finetune.py")
    return json.loads(file.read_text(encoding="utf-8"))


def load_task_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[TaskHead, dict[str, Any]]:
    """The head module with its fine-tuned weights, and the task description."""
    from safetensors.torch import load_file

    path = Path(path)
    task = read_task(path)
    cfg = read_model_config(path)
    backbone = model_from_state_dict(cfg, load_weights(path, device), device)
    head = build_head(task["kind"], backbone, len(task.get("labels") or []) or 1, task["pad_id"],
                      task.get("problem_type", "single_label"))
    head_state = load_file(str(path / HEAD_FILE), device=str(device))
    missing = head.load_state_dict(head_state, strict=False)
    bad = [k for k in missing.missing_keys if not k.startswith("model.")] + list(missing.unexpected_keys)
    if bad:
        raise DataError(f"{path / HEAD_FILE} does not match a {task['kind']} head: {bad[:5]}")
    head.to(device)
    return head, task


def to_hf_task_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, kind: str
                          ) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names of a head module's state dict (the causal-LM head is dropped)."""
    backbone, head = split_head_state(state_dict)
    hf = to_hf_state_dict(backbone, cfg)
    hf.pop("lm_head.weight", None)
    prefix = head_class(kind).hf_backbone_prefix
    out = {prefix + k.removeprefix("model."): v for k, v in hf.items()}
    out.update(head)
    return out


def export_task_hf(task_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory of the matching ``LlamaFor...`` class with tokenizer."""
    from safetensors.torch import load_file, save_file

    task_dir, out = Path(task_dir), Path(out_dir)
    task = read_task(task_dir)
    head_type = head_class(task["kind"])
    cfg = read_model_config(task_dir)
    state = {f"model.{k}": v for k, v in load_weights(task_dir).items()}
    state.update(load_file(str(task_dir / HEAD_FILE)))
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_hf_task_state_dict(state, cfg, task["kind"]).items()}
    with atomic_path(out / HF_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = to_hf_config(cfg, task.get("bos_id"), task.get("eos_id"), task["pad_id"])
    config["architectures"] = [head_type.hf_class]
    config["tie_word_embeddings"] = False  # the task classes have no output embedding to tie
    config.update(head_type.hf_config_fields(task.get("labels") or [],
                                             task.get("problem_type", "single_label")))
    atomic_write_json(out / HF_CONFIG_FILE, config, indent=2, sort_keys=False)
    write_hf_tokenizer(task_dir, out)
    return out
