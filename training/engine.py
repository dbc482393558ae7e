"""Distributed setup and the DeepSpeed engine: process group, partitioned model construction
(ZeRO-3), ``deepspeed.initialize``."""

from __future__ import annotations

import atexit
import logging
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crucible.errors import ConfigError
from training.config import TrainConfig

log = logging.getLogger("crucible.training.engine")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(train: TrainConfig, local_rank: int) -> torch.device:
    """The run's device: CPU, or the GPU ``local_rank % visible GPUs`` (so a rank that sees only
    its own GPU, as under Slurm with one GPU per task, takes GPU 0 whatever its local rank)."""
    if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    """NCCL for tensors on GPUs plus gloo for CPU tensors, object collectives and barriers
    (torch picks the backend by the tensor's device); gloo alone on CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(train: TrainConfig) -> DistContext:
    """Join (or create) the process group: deepspeed launcher, torchrun, Slurm or one process.

    The group's timeout is ``train.collective_timeout_s``: a dead or hung rank makes the others'
    next collective fail instead of blocking forever. The accelerator must match the device:
    on CPU set ``DS_ACCELERATOR=cpu`` (the tests and the CPU recipe do).
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        # srun started one task per GPU: map Slurm's variables (MASTER_ADDR comes from the
        # batch script, e.g. the first host of $SLURM_JOB_NODELIST)
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("under srun set MASTER_ADDR (and MASTER_PORT) to the first node of the job")
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_PORT", "29500")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    device = resolve_device(train, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cpu" and os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        raise ConfigError("training on CPU needs the environment variable DS_ACCELERATOR=cpu")
    if device.type == "cuda":
        os.environ["LOCAL_RANK"] = str(device.index)  # DeepSpeed places the engine by LOCAL_RANK
    if not dist.is_initialized():
        world = int(os.environ["WORLD_SIZE"])
        dist.init_process_group(
            process_group_backend(device), timeout=timedelta(seconds=train.collective_timeout_s),
            # binding the GPU lets NCCL connect eagerly; a single rank has no peer to reach
            device_id=device if device.type == "cuda" and world > 1 else None,
        )
    deepspeed.init_distributed(dist_backend=process_group_backend(device))
    if device.type == "cpu":
        atexit.register(release_cpu_shm_segment, dist.get_rank())
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def release_cpu_shm_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment (``/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, ~70 MB), which DeepSpeed never removes: every CPU
    run would otherwise leave it in memory until reboot. Safe once every rank has mapped it (all
    do at start-up); the mappings of running peers stay valid."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def partitioned_init(ds_config: dict[str, Any]) -> AbstractContextManager:
    """The context to construct a model in: under ZeRO-3 ``deepspeed.zero.Init``, so that every
    parameter is partitioned as soon as it is created and no rank ever holds the whole model
    (offloaded parameters go straight to their offload device); otherwise nothing."""
    zero = ds_config["zero_optimization"]
    if zero["stage"] != 3:
        return nullcontext()
    import deepspeed

    offload = zero.get("offload_param", {}).get("device")
    return deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=offload)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                 model_parameters: list[dict[str, Any]] | None = None) -> tuple[Any, torch.optim.Optimizer]:
    """``deepspeed.initialize`` with a client optimizer, or (``optimizer`` None) with DeepSpeed's
    own optimizer from the config over ``model_parameters``.

    Returns the engine and the optimizer whose ``param_groups`` carry the learning rate.
    """
    import deepspeed

    if optimizer is None:
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model_parameters, config=ds_config)
        return engine, ds_optimizer
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer
