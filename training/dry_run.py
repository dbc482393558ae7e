"""``--dry-run`` of pretraining: validate the recipe, check its data, print the generated DeepSpeed
config, the model-state memory per GPU from DeepSpeed's own estimators, the activation memory per
GPU (:mod:`model.memory`) and the bytes each rank writes per checkpoint save; no process group,
no training.

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
from model.config import ModelConfig, resolve_model_config
from model.flops import num_params
from model.memory import ActivationMemory, estimate_activation_memory
from model.pipeline import stage_activation_bytes, stage_params, stage_parts
from model.tensor_parallel import params_per_rank
from training.config import PretrainConfig, TrainConfig
from training.deepspeed_config import (
    build_deepspeed_config,
    estimate_memory_per_gpu,
    planned_world_size,
)
from training.init_model import find_init_source, init_model_config
from training.parallel import (
    check_model_parallel,
    check_sequence_parallel,
    data_parallel_size,
    describe_groups,
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


GIB = 1024**3
DEFAULT_WRITE_GBPS = 1.0
"""Write bandwidth per rank (GB/s, 10^9 bytes) the dry run times a checkpoint save at: an assumed
figure, not a measurement. ``torch.save`` serialises one file per rank on one thread at a few
GB/s, and a shared file system gives each of a node's 8 ranks about an eighth of the node's
link (25 GB/s for 200 Gb/s) when all write at once: 1 GB/s per rank is the conservative side."""

# Bytes per parameter in each rank's optimizer shard (DeepSpeed 0.19, ZeRO 1-3, offloaded or not):
# fp32 master weights + Adam's two moments, partitioned over the data-parallel ranks
# ([bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt). Checked by saving a 2-rank bf16 checkpoint
# of the tiny model at stages 1, 2 and 3: 990 kB a rank for 165k parameters = 12 P / 2 + 3 kB.
OPTIMIZER_SHARD_BYTES_PER_PARAM = 12


MODEL_PARALLEL_WRITERS = "each other model-parallel part's writer"
"""The key of :func:`checkpoint_bytes_per_rank` for the ranks (one per tensor-parallel rank or
pipeline stage but the first) that write their part's module weights."""


def checkpoint_bytes_per_rank(train: TrainConfig, model_cfg: ModelConfig, total_params: int, world: int,
                              model_dir_every_save: bool, part_params: list[int] | None = None
                              ) -> dict[str, dict[str, int]]:
    """What rank 0 and each other rank write in one checkpoint save: file kind -> bytes.

    DeepSpeed 0.19's files, as a 2-rank save of the tiny model shows: ZeRO 1-3 partition the
    optimizer shard (fp32 master weights and Adam moments, 12 bytes a parameter) over the ranks;
    at stages 0-2 rank 0 alone also writes the module's weights in the training dtype
    (``mp_rank_00_model_states.pt``); at stage 3 every rank writes a small model-states file (its
    unpartitioned parameters, the norm gains, and shape metadata); without ZeRO rank 0 writes the
    whole optimizer state with the module. With ``checkpoint.write_model_dir`` every_save, rank 0
    also consolidates the fp32 model directory (4 bytes a parameter). Files under 1 MB (RNG
    states, trainer state, markers) are left out.

    Tensor or pipeline parallelism (``part_params``: the parameters of each tensor-parallel rank or
    stage, ZeRO 1/2): every rank writes the optimizer shard of its part over the data-parallel
    ranks, and the first data-parallel rank of each part writes that part's module weights
    (``mp_rank_0M_model_states.pt``, or the stage's ``layer_NN-model_states.pt``): rank 0 for the
    first part, :data:`MODEL_PARALLEL_WRITERS` (the largest of them) for the others.
    """
    dtype_bytes = 4 if train.precision == "fp32" else 2
    rank0: dict[str, int] = {}
    other: dict[str, int] = {}
    if part_params is not None and len(part_params) > 1:
        dp = world // len(part_params)
        weights = f"module weights of its part ({train.precision})"
        rank0["optimizer shard"] = math.ceil(part_params[0] / dp) * OPTIMIZER_SHARD_BYTES_PER_PARAM
        rank0[weights] = part_params[0] * dtype_bytes
        largest = max(part_params[1:])
        writers = {"optimizer shard": math.ceil(largest / dp) * OPTIMIZER_SHARD_BYTES_PER_PARAM,
                   weights: largest * dtype_bytes}
        other["optimizer shard"] = math.ceil(max(part_params) / dp) * OPTIMIZER_SHARD_BYTES_PER_PARAM
        if model_dir_every_save:
            rank0["model directory (fp32 safetensors)"] = total_params * 4
        return {"rank 0": rank0, MODEL_PARALLEL_WRITERS: writers, "other ranks": other if dp > 1 else {}}
    if train.zero_stage == 0:
        # in fp32 the module's weights are the master weights: only Adam's moments are added
        optimizer = 8 if dtype_bytes == 4 else OPTIMIZER_SHARD_BYTES_PER_PARAM
        rank0["module weights + whole optimizer state"] = total_params * (dtype_bytes + optimizer)
    else:
        shard = math.ceil(total_params / world) * OPTIMIZER_SHARD_BYTES_PER_PARAM
        rank0["optimizer shard"] = other["optimizer shard"] = shard
        if train.zero_stage == 3:
            gains = (2 * model_cfg.n_layers + 1) * model_cfg.dim * dtype_bytes
            rank0["model states (norm gains)"] = other["model states (norm gains)"] = gains
        else:
            rank0[f"module weights ({train.precision})"] = total_params * dtype_bytes
    if model_dir_every_save:
        rank0["model directory (fp32 safetensors)"] = total_params * 4
    return {"rank 0": rank0, "other ranks": other if world > 1 else {}}


def pipeline_peak(model_cfg: ModelConfig, est: ActivationMemory, stages: int, grad_accum: int) -> tuple[int, int]:
    """The largest activation peak of a pipeline stage and its stage (:func:`model.pipeline.stage_activation_bytes`)."""
    head = est.final_norm_bytes + max(est.loss_forward_bytes, est.loss_backward_bytes)
    per_stage = stage_activation_bytes(model_cfg, stages, grad_accum, est.blocks_bytes, est.block_backward_bytes, head)
    stage = max(range(stages), key=per_stage.__getitem__)
    return per_stage[stage], stage


def activation_report(cfg: PretrainConfig, model_cfg: ModelConfig, seq_len: int, seq_from: str,
                      grad_accum: int = 1) -> tuple[float, list[str]]:
    """Activation GiB per GPU of the recipe's setting and the printed lines: the setting's
    breakdown and the peak for other checkpointing intervals, to choose ``model.activation_checkpointing``.
    A pipeline's figure is its most loaded stage's (``grad_accum`` micro batches per step)."""
    train = cfg.train
    dtype_bytes = 4 if train.precision == "fp32" else 2
    every = model_cfg.checkpoint_every
    device = "cpu" if train.device == "cpu" else "cuda"  # a plan is for GPUs unless the recipe says cpu
    sp, tp = train.sequence_parallel, train.tensor_parallel
    est = estimate_activation_memory(model_cfg, train.micro_batch_size, seq_len, dtype_bytes,
                                     train.loss_chunk_tokens, every, device=device, sequence_parallel=sp,
                                     tensor_parallel=tp)
    split = (f"; sequence split over {sp} ranks, {seq_len // sp} tokens per rank, attention over all tokens "
             f"for {model_cfg.n_heads // sp} heads" if sp > 1 else "")
    if tp > 1:
        split = (f"; tensor parallel {tp}: {model_cfg.n_heads // tp} heads and {model_cfg.hidden_dim // tp} of the "
                 f"MLP width per rank, norms, residual stream and loss whole")
    what = "none" if not every else ("every block" if every == 1 else f"blocks 0, {every}, {2 * every}, ...")
    loss = (f"loss in chunks of {train.loss_chunk_tokens} tokens" if train.loss_chunk_tokens
            else "full fp32 logits")
    lines = [
        f"activation memory per GPU (model/memory.py; micro batch {train.micro_batch_size} x {seq_len} tokens "
        f"({seq_from}), {train.precision}, {loss}, checkpointing {what}: {est.checkpointed_blocks} of "
        f"{model_cfg.n_layers} blocks recomputed{split}):",
        f"  {est.peak_bytes / GIB:8.2f} GiB at the peak ({est.peak_phase}): blocks keep {est.blocks_bytes / GIB:.2f} GiB "
        f"({est.block_bytes / GIB:.3f} GiB a block not recomputed)",
    ]
    others = []
    for k in sorted({0, 1, 2, 3, 4, every}):
        if k <= model_cfg.n_layers:
            peak = estimate_activation_memory(model_cfg, train.micro_batch_size, seq_len, dtype_bytes,
                                              train.loss_chunk_tokens, k, device=device,
                                              sequence_parallel=sp, tensor_parallel=tp).peak_bytes
            others.append(f"k={k}: {peak / GIB:.2f}" + (" (this recipe)" if k == every else ""))
    lines.append("  by model.activation_checkpointing (0 none, k every k-th block), GiB: " + ", ".join(others))
    pp = train.pipeline_stages
    if pp > 1:  # 1F1B: stage s keeps min(P - s, accumulation) micro batches of its own blocks
        peak, stage = pipeline_peak(model_cfg, est, pp, grad_accum)
        parts = stage_parts(model_cfg, pp)
        lines[0] = lines[0].replace("activation memory per GPU", "activation memory of the whole model, one micro batch")
        lines.append(f"  pipeline of {pp} stages (layers " + ", ".join(f"{parts[i]}-{parts[i + 1] - 1}" for i in range(pp))
                     + f"; up to {min(pp, grad_accum)} micro batches in flight): {peak / GIB:.2f} GiB per GPU on the "
                     f"most loaded stage, stage {stage}")
        return peak / GIB, lines
    if sp > 1 and model_cfg.attention == "document" and device == "cpu":
        mask = train.micro_batch_size * seq_len ** 2 * dtype_bytes
        lines.append(f"  plus the dense document mask, whole on every rank: {mask / GIB:.2f} GiB")
    return est.peak_bytes / GIB, lines


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


def dry_run_report(cfg: PretrainConfig, world_size: int | None = None,
                   write_gbps: float = DEFAULT_WRITE_GBPS) -> int:
    """Validate, check the data, print the DeepSpeed config, the model-state and activation memory
    per GPU and the bytes each rank writes per checkpoint save (timed at ``write_gbps`` GB/s per
    rank); no training. Raises a :class:`UserError` (exit 2) after the plan when something would
    stop the run."""
    if write_gbps <= 0:
        raise ConfigError(f"--write-gbps must be positive (GB/s per rank), got {write_gbps}")
    world, why = plan_world_size(cfg, world_size)
    train = cfg.train
    sp, pp, tp = train.sequence_parallel, train.pipeline_stages, train.tensor_parallel
    try:
        dp = data_parallel_size(world, sp, pp, tp)  # the ranks of a model-parallel group read the same samples
        # planned as nodes of 8 GPUs, as the memory plans below
        ds_config = build_deepspeed_config(cfg.train, cfg.optim, dp, ranks_per_node=min(world, 8))
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
    init_note = None
    if cfg.init_from:  # the run takes the source's architecture: plan with it when it exists
        try:
            source = find_init_source(cfg.init_from)
        except UserError as exc:
            init_note = f"init_from {cfg.init_from} is not readable yet ({exc}); planned with the recipe's model section"
        else:
            try:
                start = init_model_config(cfg.model, source, data.seq_len if data is not None else 0)
                cfg = cfg.model_copy(update={"model": start})
                model_cfg = resolve_model_config(start)
                init_note = f"init_from {cfg.init_from}: the {source.kind} {source.model_dir}'s architecture"
            except UserError as exc:
                problems.append(str(exc))
    if data is not None:
        try:
            model_cfg = model_config_for(cfg, data.vocab_size if not cfg.init_from else model_cfg.vocab_size,
                                         data.seq_len)
        except UserError as exc:
            problems.append(str(exc))
    planned_len = data.seq_len if data is not None else model_cfg.max_seq_len
    try:
        check_sequence_parallel(sp, planned_len, model_cfg.n_heads, model_cfg.kv_heads)
        check_model_parallel(train, model_cfg.n_layers, model_cfg.n_heads, model_cfg.kv_heads, model_cfg.hidden_dim)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (--dry-run, sequence length {planned_len})") from None
    if env_rank() != 0:
        if problems:
            raise DataError("; ".join(problems))
        return 0
    total = num_params(model_cfg)
    largest = model_cfg.vocab_size * model_cfg.dim
    vocab_from = ("init_from" if init_note and "architecture" in init_note else
                  "the tokenizer" if data is not None else "model.vocab_size, no manifest read")
    print(f"model: {model_cfg.preset or 'custom'}, {total / 1e6:.1f}M parameters "
          f"(vocabulary {model_cfg.vocab_size} from {vocab_from}; max_seq_len {model_cfg.max_seq_len})")
    if init_note:
        print(init_note)
    if model_cfg.rope_scaling.type != "none":
        rs = model_cfg.rope_scaling
        print(f"rotary scaling: {rs.type}, factor {rs.factor:g} over {rs.original_max_position_embeddings} "
              f"original positions (rope_theta {model_cfg.rope_theta:g})")
    if model_cfg.attention == "document":
        print("attention: document (each token sees only its own document of a packed sample)")
    if data is not None:
        per_step = ds_config["train_batch_size"] // tp  # DeepSpeed's count includes the tensor-parallel ranks
        epochs = cfg.train.max_steps * per_step / max(data.train_samples, 1)
        print(f"data: {data.manifests} manifest(s), seq_len {data.seq_len}, {data.train_samples:,} train "
              f"samples ({data.train_tokens:,} tokens); {cfg.train.max_steps:,} steps x {per_step} sequences "
              f"= {epochs:.2f} epochs")
    print(f"parallel groups on {world} rank(s) ({why}):")
    print("\n".join(describe_groups(world, sp, pp, tp)))
    mp = next(((k, v) for k, v in (("sequence_parallel", sp), ("pipeline_stages", pp), ("tensor_parallel", tp))
               if v > 1), None)
    print(f"deepspeed config (data-parallel size {dp}" + (f" = {world} ranks / {mp[0]} {mp[1]}" if mp else
                                                          f", from {why}") + "):")
    print(json.dumps(ds_config, indent=2, sort_keys=True))
    rank_params = (params_per_rank(model_cfg, tp) if tp > 1 else
                   max(stage_params(model_cfg, pp)) if pp > 1 else None)
    print("model-state memory from DeepSpeed's estimators (weights, gradients, optimizer; "
          "activations excluded" + (f"; tensor parallel {tp}: {rank_params / 1e6:.1f}M parameters per GPU, the "
                                    f"blocks' projections split {tp} ways, embedding, head and norms whole"
                                    if tp > 1 else "")
          + (f"; pipeline of {pp} stages: {rank_params / 1e6:.1f}M parameters on the largest stage" if pp > 1 else "")
          + "):")
    plans = [(min(world, 8), max(1, math.ceil(world / 8)))]
    plans += [p for p in ((8, 1), (8, 2), (8, 4), (8, 8), (8, 16)) if p != plans[0]]
    for i, (gpus, nodes) in enumerate(plans):
        est = estimate_memory_per_gpu(cfg.train, total, largest, gpus, nodes, rank_params)
        print(f"  {nodes:>3} node(s) x {gpus} GPU(s): {est['gpu_gib']:8.2f} GiB per GPU, "
              f"{est['cpu_gib_per_node']:8.2f} GiB CPU per node" + ("   <- this plan" if i == 0 else ""), flush=True)
    seq_len, seq_from = ((data.seq_len, "the shards' seq_len") if data is not None
                         else (model_cfg.max_seq_len, "model.max_seq_len, no manifest read"))
    activation_gib, lines = activation_report(cfg, model_cfg, seq_len, seq_from, ds_config["gradient_accumulation_steps"])
    model_state_gib = estimate_memory_per_gpu(cfg.train, total, largest, *plans[0], rank_params)["gpu_gib"]
    print("\n".join(lines))
    print(f"total per GPU for this plan: {model_state_gib:.2f} GiB model state + {activation_gib:.2f} GiB "
          f"activations = {model_state_gib + activation_gib:.2f} GiB (no allocator reserve, communication "
          "buffers or fragmentation)")
    print_checkpoint_plan(cfg, model_cfg, total, world, write_gbps)
    if problems:
        raise DataError("; ".join(problems))
    return 0


def print_checkpoint_plan(cfg: PretrainConfig, model_cfg: ModelConfig, total_params: int, world: int,
                          write_gbps: float) -> None:
    """Print the bytes rank 0 and the other ranks write per save, and the save's time at ``write_gbps``."""
    mode = cfg.checkpoint.write_model_dir
    every_save = mode is True or mode == "every_save"
    train = cfg.train
    part_params = ([params_per_rank(model_cfg, train.tensor_parallel)] * train.tensor_parallel
                   if train.tensor_parallel > 1 else
                   stage_params(model_cfg, train.pipeline_stages) if train.pipeline_stages > 1 else None)
    files = checkpoint_bytes_per_rank(train, model_cfg, total_params, world, every_save, part_params)
    counts = {"rank 0": 1, MODEL_PARALLEL_WRITERS: len(part_params or [1]) - 1}
    counts["other ranks"] = world - 1 - counts[MODEL_PARALLEL_WRITERS]
    print(f"checkpoint save (DeepSpeed's files, ZeRO stage {cfg.train.zero_stage}, {world} rank(s); "
          f"timed at {write_gbps:g} GB/s per rank, " + ("--write-gbps" if write_gbps != DEFAULT_WRITE_GBPS
                                                         else "an assumed default") + "):")
    slowest = 0
    for who, kinds in files.items():
        if not kinds:
            continue
        size = sum(kinds.values())
        slowest = max(slowest, size)
        parts = ", ".join(f"{kind} {b / GIB:.2f} GiB" for kind, b in kinds.items())
        label = f"{who} ({counts[who]} rank(s))" if who == MODEL_PARALLEL_WRITERS else who
        print(f"  {label}: {size / GIB:8.2f} GiB ({size:,} bytes) = {parts}; {size / (write_gbps * 1e9):.1f} s")
    total = sum(counts[who] * sum(kinds.values()) for who, kinds in files.items())
    print(f"  all ranks: {total / GIB:.2f} GiB per save; the save takes as long as its slowest rank, "
          f"{slowest / (write_gbps * 1e9):.1f} s" + ("" if every_save else
          f" (checkpoint.write_model_dir={mode}: the fp32 model directory, {total_params * 4 / GIB:.2f} GiB, "
          "is not part of each save)"))
