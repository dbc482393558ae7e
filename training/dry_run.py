"""``--dry-run`` of pretraining: validate the recipe, check its data, print the generated DeepSpeed
config and the model-state memory per GPU from DeepSpeed's own estimators; no process group, no
training.

It plans for ``--world-size`` GPUs, else the launcher's ``WORLD_SIZE``, else the count the recipe
was written for (:func:`training.deepspeed_config.planned_world_size`). The whole plan is printed
even when something is wrong; the problems (missing manifests, a context too short for the
shards) then end the dry run with one error line and exit status 2, as the real run would.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from crucible.errors import ConfigError, DataError, UserError
from crucible.runtime import env_rank
from data_pipeline.loader.base import load_sources
from data_pipeline.shards.manifest import is_url
from model.config import resolve_model_config
from model.flops import num_params
from training.config import PretrainConfig
from training.deepspeed_config import (
    build_deepspeed_config,
    estimate_memory_per_gpu,
    planned_world_size,
)
from training.steps.language_model import model_config_for, require_manifests


@dataclass(frozen=True)
class DataSummary:
    """What the manifests say about the training data."""

    manifests: int
    seq_len: int
    vocab_size: int
    train_samples: int
    train_tokens: int
    missing_shards: list[str]


def plan_world_size(cfg: PretrainConfig, world_size: int | None) -> tuple[int, str]:
    """The data-parallel size to plan for and why: ``--world-size``, the launcher's
    ``WORLD_SIZE``, or the recipe's own (``train.planned_world_size`` or its batch arithmetic)."""
    if world_size is not None:
        return world_size, "--world-size"
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var]), f"the launcher's {var}"
    return planned_world_size(cfg.train)


def check_data(cfg: PretrainConfig) -> DataSummary:
    """Read the manifests as the loader would (existence, format, matching tokenizer and
    seq_len across sources, train samples) and look for every listed shard file (local shards
    only; ``launcher/shard.py --verify`` also compares their checksums)."""
    if not cfg.data.manifests:
        raise DataError("data.manifests is empty: list the manifest.json of your token shards, e.g. "
                        "data.manifests=[runs/sample/shards/manifest.json]")
    require_manifests(cfg.data.manifests)
    sources = load_sources(cfg.data, "train")
    first = sources[0].manifest
    absent = [url for s in sources for url in s.index.urls
              if not is_url(url) and not url.startswith("pipe:") and not Path(url).is_file()]
    return DataSummary(
        manifests=len(sources), seq_len=first.seq_len, vocab_size=int(first.tokenizer["vocab_size"]),
        train_samples=sum(s.num_samples for s in sources),
        train_tokens=sum(int(s.index.tokens.sum()) for s in sources), missing_shards=absent)


def dry_run_report(cfg: PretrainConfig, world_size: int | None = None) -> int:
    """Validate, check the data, print the DeepSpeed config and model-state memory per GPU; no
    training. Raises a :class:`UserError` (exit 2) after the plan when something would stop the run."""
    world, why = plan_world_size(cfg, world_size)
    try:
        # planned as nodes of 8 GPUs, as the memory plans below
        ds_config = build_deepspeed_config(cfg.train, cfg.optim, world, ranks_per_node=min(world, 8))
    except ConfigError as exc:
        if world_size is None:
            raise ConfigError(f"{exc} (--dry-run planned for {world} rank(s), {why}; pass --world-size N "
                              "to plan for N GPUs, or set train.planned_world_size)") from None
        raise
    problems: list[str] = []
    data: DataSummary | None = None
    try:
        data = check_data(cfg)
    except DataError as exc:
        problems.append(str(exc))
    if data is not None and data.missing_shards:
        problems.append(f"{len(data.missing_shards)} shard file(s) listed in the manifests are missing, "
                        f"e.g. {data.missing_shards[0]}; rebuild the token shards or restore the files")
    model_cfg = resolve_model_config(cfg.model)
    if data is not None:
        try:
            model_cfg = model_config_for(cfg, data.vocab_size, data.seq_len)
        except UserError as exc:
            problems.append(str(exc))
    if env_rank() != 0:
        if problems:
            raise DataError("; ".join(problems))
        return 0
    total = num_params(model_cfg)
    largest = model_cfg.vocab_size * model_cfg.dim
    vocab_from = "the tokenizer" if data is not None else "model.vocab_size, no manifest read"
    print(f"model: {model_cfg.preset or 'custom'}, {total / 1e6:.1f}M parameters "
          f"(vocabulary {model_cfg.vocab_size} from {vocab_from}; max_seq_len {model_cfg.max_seq_len})")
    if data is not None:
        per_step = ds_config["train_batch_size"]
        epochs = cfg.train.max_steps * per_step / max(data.train_samples, 1)
        print(f"data: {data.manifests} manifest(s), seq_len {data.seq_len}, {data.train_samples:,} train "
              f"samples ({data.train_tokens:,} tokens); {cfg.train.max_steps:,} steps x {per_step} sequences "
              f"= {epochs:.2f} epochs")
    print(f"deepspeed config (data-parallel size {world}, from {why}):")
    print(json.dumps(ds_config, indent=2, sort_keys=True))
    print("model-state memory from DeepSpeed's estimators (weights, gradients, optimizer; "
          "activations excluded):")
    plans = [(min(world, 8), max(1, math.ceil(world / 8)))]
    plans += [p for p in ((8, 1), (8, 2), (8, 4), (8, 8), (8, 16)) if p != plans[0]]
    for i, (gpus, nodes) in enumerate(plans):
        est = estimate_memory_per_gpu(cfg.train, total, largest, gpus, nodes)
        print(f"  {nodes:>3} node(s) x {gpus} GPU(s): {est['gpu_gib']:8.2f} GiB per GPU, "
              f"{est['cpu_gib_per_node']:8.2f} GiB CPU per node" + ("   <- this plan" if i == 0 else ""), flush=True)
    if problems:
        raise DataError("; ".join(problems))
    return 0
