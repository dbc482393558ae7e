"""Distributed setup and the DeepSpeed engine: process group, partitioned model construction
(ZeRO-3), ``deepspeed.initialize``."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crucible.errors import ConfigError
from training.collectives import barrier, gather_objects
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


NCCL_ENV_DEFAULTS: dict[str, str] = {
    # on a failed or timed-out NCCL collective the watchdog aborts the communicators and ends the
    # process (exit != 0, the launcher stops the job) instead of leaving every rank hung
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # wait() stays asynchronous: a blocking wait (1) would sync the host on every collective and
    # lose DeepSpeed's overlap of communication with compute; the timeout is enforced by the
    # watchdog above either way
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}


def set_nccl_env_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`NCCL_ENV_DEFAULTS` where the environment leaves them unset (a value the user
    exported, e.g. in ``.deepspeed_env``, wins); returns what was set. Read by NCCL when the
    process group is created, so called before it."""
    env = os.environ if environ is None else environ
    added = {key: value for key, value in NCCL_ENV_DEFAULTS.items() if key not in env}
    env.update(added)
    return added


def use_environment_ninja() -> bool:
    """Put this Python environment's ``bin`` folder first on ``PATH`` when it holds ``ninja``.

    DeepSpeed builds its CPU ops (``deepspeed_shm_comm`` at start-up, ``cpu_adam``) with the
    first ``ninja`` on ``PATH``, in one shared folder (``~/.cache/torch_extensions``). Ninja
    versions hash the build commands differently (1.11 from apt and 1.13 from pip do), so when a run started by the
    ``deepspeed`` command (the environment's ninja) alternates with one started as plain
    ``python`` (the system's ninja), each finds the other's log entries stale and rebuilds the
    op: 45-100 s before the first step, measured on 2 cores. Returns whether ``PATH`` changed.
    """
    env_bin = str(Path(sys.executable).parent)
    if not (Path(env_bin) / "ninja").is_file():
        return False
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path and path[0] == env_bin:
        return False
    os.environ["PATH"] = os.pathsep.join([env_bin, *(p for p in path if p != env_bin)])
    return True


def init_distributed(train: TrainConfig) -> DistContext:
    """Join (or create) the process group: deepspeed launcher, torchrun, Slurm or one process.

    The group's timeout is ``train.collective_timeout_s``: a dead or hung rank makes the others'
    next collective fail instead of blocking forever (on GPUs with NCCL's async error handling,
    :data:`NCCL_ENV_DEFAULTS`). The accelerator must match the device:
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
        if device.type == "cuda":
            set_nccl_env_defaults()
        dist.init_process_group(
            process_group_backend(device), timeout=timedelta(seconds=train.collective_timeout_s),
            # binding the GPU lets NCCL connect eagerly; a single rank has no peer to reach
            device_id=device if device.type == "cuda" and world > 1 else None,
        )
    use_environment_ninja()  # before DeepSpeed builds or loads its CPU ops
    deepspeed.init_distributed(dist_backend=process_group_backend(device))
    if device.type == "cpu":
        atexit.register(release_cpu_shm_segment, dist.get_rank())
    watch_deepspeed_launcher()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def check_writable_on_every_rank(directory: Path, rank: int, world_size: int) -> None:
    """Every rank writes, sees and removes probe files in ``directory`` before the first step.

    Each rank writes ``.write-probe-rank<N>``; after a barrier each rank checks that it sees every
    rank's probe (a directory on node-local disk passes a plain write test on every node, but
    each node would then hold only its own ranks' checkpoint shards and no resume could load
    them). All ranks agree on the outcome, so a failure is the same one-line :class:`UserError`
    (exit 2) on every rank, naming the rank, its host and the path, instead of a crash at the
    first save hours later.
    """
    host = socket.gethostname()
    probe = directory / f".write-probe-rank{rank}"
    problem: str | None = None
    wrote = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text(host)
        wrote = True
    except OSError as exc:
        problem = f"rank {rank} on host {host} cannot write to {directory} ({exc.strerror or exc})"
    problems = gather_objects(problem, world_size)  # also: every rank has written its probe
    if not any(problems):
        missing = [r for r in range(world_size) if not (directory / f".write-probe-rank{r}").is_file()]
        problem = (f"rank {rank} on host {host} does not see the probe files of rank(s) "
                   f"{', '.join(map(str, missing))} in {directory}, so it is not shared storage"
                   if missing else None)
        problems = gather_objects(problem, world_size)
    barrier()  # every rank has looked before any probe goes
    if wrote:
        probe.unlink(missing_ok=True)
    first = next((p for p in problems if p), None)
    if first is not None:
        raise ConfigError(f"checkpoint directory not usable: {first}; set run_dir to a directory that "
                          "every rank can write and that all nodes share (the same network "
                          "filesystem path on every node)")


def release_cpu_shm_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment (``/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, ~70 MB), which DeepSpeed never removes: every CPU
    run would otherwise leave it in memory until reboot. Safe once every rank has mapped it (all
    do at start-up); the mappings of running peers stay valid."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


DEEPSPEED_LAUNCH_MODULE = "deepspeed.launcher.launch"


def watch_deepspeed_launcher(poll_seconds: float = 1.0) -> threading.Thread | None:
    """Under the ``deepspeed`` command, stop as on SIGTERM when that command goes away.

    ``deepspeed`` (``deepspeed/launcher/runner.py``) starts ``python -m deepspeed.launcher.launch``
    on each node, which starts the ranks. On a single node the runner installs no signal handler,
    so ``kill <pid of deepspeed>`` ends the runner alone and leaves ``launch.py`` and the ranks
    training as orphans. Each rank started by ``launch.py`` therefore watches its parent and its
    parent's parent (the runner, or the ssh session on other nodes): when either is gone, the rank
    sends itself SIGTERM, which the trainer turns into a checkpoint at the next step boundary on
    every rank and exit 0; ``launch.py`` then exits with them. Returns the watching thread, or
    None when the rank was not started by ``launch.py``.
    """
    import psutil

    try:
        launch = psutil.Process(os.getppid())
        if DEEPSPEED_LAUNCH_MODULE not in " ".join(launch.cmdline()):
            return None
        runner_pid = launch.ppid()
    except psutil.Error:
        return None
    stop = threading.Event()

    def gone() -> str | None:
        if os.getppid() != launch.pid:
            return f"DeepSpeed's launch.py (pid {launch.pid})"
        try:
            if launch.ppid() == runner_pid:
                return None
        except psutil.Error:
            return f"DeepSpeed's launch.py (pid {launch.pid})"
        return f"the deepspeed command (pid {runner_pid})"

    def watch() -> None:
        while not stop.wait(poll_seconds):
            what = gone()
            if what is not None:
                log.warning("%s exited: stopping as on SIGTERM (every rank saves a checkpoint at the next "
                            "step boundary and exits)", what)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="deepspeed-launcher-watch", daemon=True)
    thread.start()
    atexit.register(stop.set)
    return thread


class _UntestedOptimizerFilter(logging.Filter):
    """Drops DeepSpeed's "ZeRO with an untested optimizer" warning (see :func:`build_engine`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def zero_supported_base(optimizer: torch.optim.Optimizer) -> type | None:
    """The optimizer class ZeRO supports (DeepSpeed's own list) that ``optimizer`` extends, if any.

    DeepSpeed compares the exact type, so a subclass such as ``SkippingAdamW`` (torch AdamW plus
    one all-reduced finite check before stepping) counts as untested although every update is
    its parent's."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    return next((base for base in type(optimizer).__mro__ if base in ZERO_SUPPORTED_OPTIMIZERS), None)


def partitioned_init(ds_config: dict[str, Any], mpu: Any = None) -> AbstractContextManager:
    """The context to construct a model in: under ZeRO-3 ``deepspeed.zero.Init``, so that every
    parameter is partitioned as soon as it is created and no rank ever holds the whole model
    (offloaded parameters go straight to their offload device); otherwise nothing. ``mpu``: as
    for :func:`build_engine` (DeepSpeed's batch check then counts data-parallel ranks only)."""
    zero = ds_config["zero_optimization"]
    if zero["stage"] != 3:
        return nullcontext()
    import deepspeed

    offload = zero.get("offload_param", {}).get("device")
    return deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=offload, mpu=mpu)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                 model_parameters: list[dict[str, Any]] | None = None,
                 mpu: Any = None) -> tuple[Any, torch.optim.Optimizer]:
    """``deepspeed.initialize`` with a client optimizer, or (``optimizer`` None) with DeepSpeed's
    own optimizer from the config over ``model_parameters``. ``mpu``: the model-parallel groups
    (sequence parallelism: :func:`training.parallel.initialize_sequence_parallel`'s).

    Returns the engine and the optimizer whose ``param_groups`` carry the learning rate.
    """
    import deepspeed

    if optimizer is None:
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model_parameters, config=ds_config, mpu=mpu)
        return engine, ds_optimizer
    base = zero_supported_base(optimizer) if ds_config["zero_optimization"]["stage"] > 0 else None
    quiet = _UntestedOptimizerFilter()
    if base is not None and type(optimizer) is not base:
        # DeepSpeed warns on every run that ZeRO meets an "untested optimizer" (its check is by
        # exact type); ours only adds a step-skipping check to a class ZeRO supports
        log.debug("%s extends %s.%s, which ZeRO supports: DeepSpeed's untested-optimizer warning is "
                  "not shown", type(optimizer).__name__, base.__module__, base.__name__)
        logging.getLogger("DeepSpeed").addFilter(quiet)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    finally:
        logging.getLogger("DeepSpeed").removeFilter(quiet)
    return engine, optimizer
