"""``--dry-run`` of pretraining: validate the recipe, print the generated DeepSpeed config and the
model-state memory per GPU from DeepSpeed's own estimators; no process group, no training."""

from __future__ import annotations

import json
import math

from crucible.runtime import env_rank, env_world_size
from model.config import resolve_model_config
from model.flops import num_params
from training.config import PretrainConfig
from training.deepspeed_config import build_deepspeed_config, estimate_memory_per_gpu


def dry_run_report(cfg: PretrainConfig, world_size: int | None = None) -> int:
    """Validate, print the DeepSpeed config and model-state memory per GPU; no training."""
    world = world_size or env_world_size()
    model_cfg = resolve_model_config(cfg.model)
    ds_config = build_deepspeed_config(cfg.train, cfg.optim, world)
    if env_rank() != 0:
        return 0
    total = num_params(model_cfg)
    largest = model_cfg.vocab_size * model_cfg.dim
    print(f"model: {model_cfg.preset or 'custom'}, {total / 1e6:.1f}M parameters")
    print(f"deepspeed config (data-parallel size {world}):")
    print(json.dumps(ds_config, indent=2, sort_keys=True))
    print("model-state memory from DeepSpeed's estimators (weights, gradients, optimizer; "
          "activations excluded):")
    plans = [(min(world, 8), max(1, math.ceil(world / 8)))]
    plans += [p for p in ((8, 1), (8, 2), (8, 4), (8, 8), (8, 16)) if p != plans[0]]
    for i, (gpus, nodes) in enumerate(plans):
        est = estimate_memory_per_gpu(cfg.train, total, largest, gpus, nodes)
        print(f"  {nodes:>3} node(s) x {gpus} GPU(s): {est['gpu_gib']:8.2f} GiB per GPU, "
              f"{est['cpu_gib_per_node']:8.2f} GiB CPU per node" + ("   <- this plan" if i == 0 else ""))
    return 0
