"""Typed training config -> DeepSpeed JSON config, with the batch arithmetic checked.

The DeepSpeed config is always generated from :class:`training.config.PretrainConfig`, never
hand-kept; the generated JSON is saved in the run directory (``deepspeed_config.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.errors import ConfigError
from crucible.fileio import atomic_write_json
from training.config import ZERO_KEYS_BY_STAGE, OptimConfig, TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    """The resolved batch arithmetic: ``global = micro x accum x data_parallel``."""

    micro_batch_size: int
    grad_accum_steps: int
    data_parallel_size: int
    global_batch_size: int


def resolve_batch(train: TrainConfig, data_parallel_size: int) -> BatchPlan:
    """``global_batch_size = micro_batch_size x grad_accum_steps x data_parallel_size``.

    ``grad_accum_steps`` null derives the accumulation from ``global_batch_size`` (so a recipe
    keeps its global batch on any number of GPUs), or is 1 without one; ``global_batch_size``
    null means "whatever the product is". An error shows all the numbers and how to fix them,
    because on a cluster the data-parallel size changes with the hostfile.
    """
    if data_parallel_size <= 0:
        raise ConfigError(f"data-parallel size must be positive, got {data_parallel_size}")
    per_step = train.micro_batch_size * data_parallel_size
    accum = train.grad_accum_steps
    if accum is None:
        if train.global_batch_size is None:
            accum = 1
        elif train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({train.global_batch_size}) is not a multiple of "
                f"train.micro_batch_size ({train.micro_batch_size}) x data-parallel size "
                f"({data_parallel_size}) = {per_step}, so no accumulation fits; choose a micro batch "
                "or a GPU count that divides it, or set train.global_batch_size"
            )
        else:
            accum = train.global_batch_size // per_step
    product = per_step * accum
    if train.global_batch_size is not None and train.global_batch_size != product:
        hint = ""
        if train.global_batch_size % per_step == 0:
            hint = f" (e.g. train.grad_accum_steps={train.global_batch_size // per_step}, or null to derive it)"
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must equal "
            f"train.micro_batch_size ({train.micro_batch_size}) x train.grad_accum_steps "
            f"({accum}) x data-parallel size ({data_parallel_size}) = {product}; "
            f"change one of them{hint} or set train.global_batch_size=null"
        )
    return BatchPlan(train.micro_batch_size, accum, data_parallel_size, product)


def planned_world_size(train: TrainConfig) -> tuple[int, str]:
    """The data-parallel size a recipe was written for, and where that number comes from:
    ``train.planned_world_size``, else ``global / (micro x accumulation)`` when both are fixed,
    else 1 (nothing in the recipe says)."""
    if train.planned_world_size is not None:
        return train.planned_world_size, "train.planned_world_size"
    if train.grad_accum_steps is not None and train.global_batch_size is not None:
        per_rank = train.micro_batch_size * train.grad_accum_steps
        if train.global_batch_size % per_rank == 0:
            return (train.global_batch_size // per_rank,
                    "train.global_batch_size / (train.micro_batch_size x train.grad_accum_steps)")
    return 1, "default: the recipe sets no train.planned_world_size"


def check_device_support(train: TrainConfig, device_type: str) -> None:
    """Refuse combinations the device cannot run, with a message saying what to use instead."""
    if device_type == "cpu" and train.precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling has no CPU "
            "implementation); use train.precision=fp32 (or bf16) on CPU"
        )
    if device_type == "cpu" and "nvme" in (train.offload_optimizer, train.offload_params):
        raise ConfigError("nvme offload needs a GPU with async I/O; use train.offload_*=cpu or none on CPU")


def _offload(target: str, nvme_path: str | None) -> dict[str, Any]:
    block: dict[str, Any] = {"device": target, "pin_memory": target != "none"}
    if target == "nvme":
        block["nvme_path"] = nvme_path
    return block


def build_zero_section(train: TrainConfig) -> dict[str, Any]:
    """``zero_optimization`` with the ``train.zero`` settings of this stage and only those."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    settings = train.zero
    keys = ZERO_KEYS_BY_STAGE[train.zero_stage]
    for name in keys:
        if name == "communication_data_type":
            continue  # a top-level DeepSpeed key, see build_deepspeed_config
        value = getattr(settings, name)
        if name == "overlap_comm" and value == "auto":
            value = train.device != "cpu"
        zero[name] = value
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if train.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(train.offload_optimizer, train.nvme_path)
    if train.offload_params != "none":
        zero["offload_param"] = _offload(train.offload_params, train.nvme_path)
    return zero


def check_hpz(train: TrainConfig, data_parallel_size: int, ranks_per_node: int | None) -> None:
    """hpZ groups ``train.zero.zero_hpz_partition_size`` consecutive ranks; the groups must tile
    the world and, for the all-gathers to stay on the intra-node links, each node."""
    hpz = train.zero.zero_hpz_partition_size
    if hpz == 1:
        return
    key = f"train.zero.zero_hpz_partition_size={hpz}"
    if data_parallel_size % hpz:
        raise ConfigError(f"{key} must divide the data-parallel size ({data_parallel_size}); set it to the "
                          "GPUs per node (or 1 to turn hpZ off)")
    if ranks_per_node is not None and ranks_per_node % hpz:
        raise ConfigError(f"{key} must divide the ranks per node ({ranks_per_node}) so its all-gathers stay "
                          "inside a node; set it to the GPUs per node (or 1 to turn hpZ off)")


def ranks_per_node(world_size: int) -> int:
    """Ranks on this node as the launcher says (deepspeed: ``LOCAL_SIZE``, torchrun:
    ``LOCAL_WORLD_SIZE``, Slurm: ``SLURM_NTASKS_PER_NODE``), else the whole world (one node)."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world_size


def build_precision_section(train: TrainConfig) -> dict[str, Any]:
    if train.precision == "bf16":
        return {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    if train.precision == "fp16":
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,  # 0 = dynamic loss scaling
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    return {}


def build_optimizer_section(optim: OptimConfig) -> dict[str, Any]:
    """Only for ``optim.implementation=deepspeed``: DeepSpeed builds its fused / CPU Adam.

    Weight decay per parameter group comes from the groups passed to ``deepspeed.initialize``.
    """
    return {
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    }


def build_deepspeed_config(
    train: TrainConfig,
    optim: OptimConfig,
    data_parallel_size: int,
    load_universal: bool = False,
    ranks_per_node: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (pure function of the typed config, the DP size and,
    when known, the ranks per node that hpZ must divide).

    With ``train.tensor_parallel`` = T > 1 the ``tensor_parallel`` block turns on DeepSpeed's AutoTP
    training with :data:`model.tensor_parallel.PARTITION_CONFIG`, and ``train_batch_size`` is the
    global batch x T: DeepSpeed checks ``train_batch_size = micro x accumulation x world`` before
    it knows the tensor-parallel groups, counting every rank as data parallel, while the samples
    per step stay ``micro x accumulation x data_parallel_size`` (each tensor-parallel group reads
    the same ones). Gradient clipping needs nothing: DeepSpeed's norm counts a split weight's
    shards once each and a replicated parameter once."""
    plan = resolve_batch(train, data_parallel_size)
    check_hpz(train, data_parallel_size, ranks_per_node)
    tp = train.tensor_parallel
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size * tp,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        # DeepSpeed 0.19 clips at 1.0 unless told; 0.0 disables clipping. Without ZeRO our
        # torch optimizer clips itself (and so can report the norm), see training.optim
        "gradient_clipping": (
            0.0 if train.zero_stage == 0 and optim.implementation == "torch" else float(optim.grad_clip)
        ),
        "zero_optimization": build_zero_section(train),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    config.update(build_precision_section(train))
    if tp > 1:
        from model.tensor_parallel import PARTITION_CONFIG

        config["tensor_parallel"] = {"autotp_size": tp, "partition_config": PARTITION_CONFIG}
    if train.zero.communication_data_type != "auto":
        config["communication_data_type"] = train.zero.communication_data_type
    if optim.implementation == "deepspeed":
        config.update(build_optimizer_section(optim))
    elif train.offload_optimizer != "none":
        # let DeepSpeed accept our torch.optim.AdamW with an offloaded optimizer
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def save_deepspeed_config(config: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, config)
    return path


def estimate_memory_per_gpu(
    train: TrainConfig, total_params: int, largest_layer_params: int, gpus_per_node: int, num_nodes: int,
    rank_params: int | None = None,
) -> dict[str, float]:
    """Model-state memory per GPU and per node (GiB) from DeepSpeed's own estimators.

    Activations are not included (they depend on micro batch, sequence length and activation
    checkpointing); the numbers bound weights, gradients and optimizer state.

    Tensor parallelism (``train.tensor_parallel`` = T > 1): ``rank_params`` is what one rank
    holds (:func:`model.tensor_parallel.params_per_rank`: block projections / T, embedding, head
    and norms whole), and ZeRO partitions its gradients and optimizer state over the
    ``gpus / T`` data-parallel ranks, not over every GPU. Pipelines (``train.pipeline_stages`` = P):
    ``rank_params`` is the largest stage's (:func:`model.pipeline.stage_params`), ZeRO over ``gpus / P``.
    """
    gib = 1024**3
    tp = train.tensor_parallel * train.pipeline_stages  # at most one of them > 1
    if tp > 1:
        if rank_params is None:
            raise ValueError("estimate_memory_per_gpu: tensor or pipeline parallelism needs rank_params")
        total_gpus = gpus_per_node * num_nodes
        if total_gpus % tp:
            key = "tensor_parallel" if train.tensor_parallel > 1 else "pipeline_stages"
            raise ConfigError(f"train.{key}={tp} must divide the {total_gpus} GPUs of the plan")
        # the GPU figure depends on the number of ranks sharing the optimizer state only: give
        # the estimator the data-parallel count; the CPU figure is per node as without TP
        _, gpu = _zero12_states_bytes(train, rank_params, 1, total_gpus // tp)
        cpu, _ = _zero12_states_bytes(train, rank_params, gpus_per_node, num_nodes)
        return {"gpu_gib": gpu / gib, "cpu_gib_per_node": cpu / gib}
    if train.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, gpus_per_node, num_nodes,
            cpu_offload=train.offload_optimizer != "none",
            cpu_offload_params=train.offload_params != "none",
            zero_init=True,
        )
    elif train.zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params, gpus_per_node, num_nodes, cpu_offload=train.offload_optimizer != "none"
        )
    else:
        # no partitioning: 16-bit params + 16-bit grads + fp32 master/grad + Adam moments (18 B),
        # or 16 B in fp32 (params, grads, two moments)
        bytes_per_param = 16 if train.precision == "fp32" else 18
        gpu, cpu = total_params * bytes_per_param, total_params * 4 * gpus_per_node
    return {"gpu_gib": gpu / gib, "cpu_gib_per_node": cpu / gib}


def _zero12_states_bytes(train: TrainConfig, params: int, gpus_per_node: int,
                         num_nodes: int) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes) of ``params`` under ZeRO 1/2 (DeepSpeed's estimator;
    tensor parallelism refuses offload and ZeRO 0/3, see training.config)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if train.zero_stage not in (1, 2):
        raise ValueError(f"tensor-parallel memory is estimated for ZeRO 1/2, not {train.zero_stage}")
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, num_nodes,
                                                     cpu_offload=train.offload_optimizer != "none")
    return int(cpu), int(gpu)
