"""Typed training configuration: one section per component.

Sections: ``optim``, ``schedule``, ``train``, ``checkpoint``, ``log``, ``harness`` and ``task``; the
pretrain and fine-tune root configs combine them with ``data`` (the loader) and ``model``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from crucible.config import Section
from data_pipeline.loader.config import LoaderConfig
from model.config import ModelConfig


class OptimConfig(Section):
    """AdamW optimizer (section ``optim``)."""

    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay."""
    decay_norms_and_embeddings: bool = False
    """Also decay norm gains and embeddings (by default only weight matrices are decayed)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """Adam beta2."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables clipping)."""
    implementation: Literal["torch", "deepspeed"] = "torch"
    """torch: torch.optim.AdamW (exact resume on CPU); deepspeed: DeepSpeed's fused Adam / CPU Adam."""


class ScheduleConfig(Section):
    """Learning-rate schedule (section ``schedule``)."""

    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Shape after warmup: cosine decay, linear decay, warmup-stable-decay, or constant."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps from 0 to optim.lr."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of optim.lr."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd only: fraction of the steps after warmup spent decaying."""


_ZERO_1_2 = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
             "communication_data_type")
ZERO_KEYS_BY_STAGE: dict[int, tuple[str, ...]] = {
    0: ("communication_data_type",),
    1: _ZERO_1_2,
    2: _ZERO_1_2,
    3: ("reduce_bucket_size", "overlap_comm", "contiguous_gradients", "communication_data_type",
        "stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
        "stage3_param_persistence_threshold", "zero_hpz_partition_size"),
}
"""The ``train.zero`` settings DeepSpeed reads at each ZeRO stage."""


class ZeroConfig(Section):
    """DeepSpeed ZeRO tuning (section ``train.zero``), written into the generated DeepSpeed JSON
    only for the stages each setting applies to. The defaults are DeepSpeed 0.19's own; a value
    other than the default for a stage it does not apply to is refused. Sizes count elements
    (parameters or gradient values), not bytes, as DeepSpeed does."""

    reduce_bucket_size: int = Field(500_000_000, gt=0)
    """Stages 1-3: gradient elements reduced (reduce-scatter) per collective; bigger buckets amortise latency, each costs its size in communication buffer."""
    allgather_bucket_size: int = Field(500_000_000, gt=0)
    """Stages 1-2: updated-parameter elements all-gathered per collective after the optimizer step."""
    overlap_comm: bool | Literal["auto"] = "auto"
    """Stages 1-3: overlap gradient reduction with the backward pass (auto: on unless train.device=cpu)."""
    contiguous_gradients: bool = True
    """Stages 1-3: copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0)
    """Stage 3: parameter elements all-gathered ahead of use (about one Transformer block overlaps its gather with the block before)."""
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=0)
    """Stage 3: most gathered (full) parameter elements kept on a GPU before they are released."""
    stage3_max_reuse_distance: int = Field(1_000_000_000, ge=0)
    """Stage 3: keep a gathered parameter whose next use is within this many parameter elements (e.g. the recomputed forward of a checkpointed block before its backward)."""
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    """Stage 3: parameters smaller than this stay whole on every GPU (norm gains, biases), saving latency-bound gathers."""
    zero_hpz_partition_size: int = Field(1, gt=0)
    """Stage 3 (ZeRO++ hpZ): also keep a secondary copy of the bf16 parameters partitioned over groups of this many ranks, so backward all-gathers stay inside a node; set it to the GPUs per node (it must divide them and the world size); 1: off."""
    communication_data_type: Literal["auto", "fp32", "bf16"] = "auto"
    """Data type of gradient reduction (auto: the training precision, DeepSpeed's default). fp32 sums bf16 gradients without rounding at every hop at twice the traffic."""

    def changed(self) -> list[str]:
        """Fields whose value differs from the default (set by the recipe or the command line)."""
        return [name for name, field in type(self).model_fields.items() if getattr(self, name) != field.default]


class TrainConfig(Section):
    """Training loop and parallelism (section ``train``)."""

    max_steps: int = Field(100, gt=0)
    """Stop after this many optimizer steps."""
    max_tokens: int | None = Field(None, gt=0)
    """Also stop once this many training tokens were consumed (null: no token limit)."""
    micro_batch_size: int = Field(8, gt=0)
    """Sequences per rank per forward pass."""
    grad_accum_steps: int | None = Field(None, gt=0)
    """Micro batches accumulated per optimizer step (null: global_batch_size / (micro_batch_size x data-parallel size) when global_batch_size is set, else 1)."""
    global_batch_size: int | None = Field(None, gt=0)
    """Sequences per optimizer step over all ranks; checked against micro_batch x grad_accum x data-parallel size."""
    planned_world_size: int | None = Field(None, gt=0)
    """Ranks (GPUs) the recipe was written for: --dry-run plans for this many unless --world-size is given (null: derived from global_batch_size / (micro_batch_size x grad_accum_steps) when both are fixed, else 1). A run on another count keeps its global batch when grad_accum_steps is null."""
    loss_chunk_tokens: int = Field(1024, ge=0)
    """Tokens per chunk of the next-token loss: the logits are computed, upcast to fp32 and turned into gradients one chunk at a time, so no (tokens x vocabulary) fp32 logits are held (0: the full logits at once, as a plain loop does)."""
    compile: bool = False
    """torch.compile each Transformer block on its own (regional compilation; embedding, head and loss stay eager): faster steps after a slower start (inductor compiles the blocks' kernels before the first step; its cache, /tmp/torchinductor_<user> or TORCHINDUCTOR_CACHE_DIR, makes later starts faster). Losses match eager within float rounding."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage."""
    sequence_parallel: int = Field(1, gt=0)
    """Ranks that split each sample's sequence (DeepSpeed-Ulysses): every group of this many consecutive ranks reads the same samples, each rank runs 1/N of the tokens, and attention exchanges heads with an all-to-all; the data-parallel size is world / N. Needs world size, sequence length, n_heads and kv_heads divisible by N; not with offload, compile, hpZ or harness tasks (1: off)."""
    pipeline_stages: int = Field(1, gt=0)
    """Pipeline parallelism (DeepSpeed's PipelineModule): the model's layers (embedding, blocks, final norm and head) split into this many stages on consecutive groups of world / P ranks, micro batches flowing through them (1F1B); the data-parallel size is world / P. ZeRO-1 only (DeepSpeed refuses 2 and 3 with a pipeline; without ZeRO the gradient clipping would see one stage's norm); not with sequence or tensor parallelism, offload, compile or harness tasks (1: off)."""
    tensor_parallel: int = Field(1, gt=0)
    """Tensor parallelism (DeepSpeed AutoTP training): every group of this many consecutive ranks splits each block's attention and MLP weights (q/k/v, gate and up by output rows, o and down by input columns) and reads the same samples; the data-parallel size is world / T. Needs n_heads, kv_heads and the MLP width divisible by T; ZeRO 1 or 2; not with sequence or pipeline parallelism, offload, compile or harness tasks (1: off)."""
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    """ZeRO communication and memory tuning (bucket sizes, ZeRO-3 prefetch, hpZ, gradient dtype)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 (dynamic loss scaling) needs a GPU."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Offload the optimizer state (ZeRO 1-3)."""
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """Offload the parameters (ZeRO 3 only)."""
    nvme_path: str | None = None
    """Directory on a fast local disk, required when an offload target is nvme."""
    seed: int = 1234
    """Seed for model init and every random choice of the run."""
    eval_every: int = Field(50, ge=0)
    """Run validation every N steps (0: only at the end)."""
    eval_batches: int = Field(8, gt=0)
    """Validation micro batches per evaluation and per planned rank: eval_batches x micro_batch_size x planned_world_size (this run's data-parallel size when null) sequences, shared evenly over the sources' validation splits (the first sequences of each), the same on any number of ranks (val/... metrics)."""
    eval_full_at_end: bool = True
    """At the end of the run also evaluate every sequence of every source's validation split (val_full/... metrics at the last step; language modelling): one forward pass per validation sequence."""
    max_bad_steps: int = Field(5, gt=0)
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    collective_timeout_s: float = Field(600.0, gt=0)
    """A collective that waits longer than this (dead or hung rank) fails the run: the process group's timeout, for gloo and NCCL alike (NCCL aborts through TORCH_NCCL_ASYNC_ERROR_HANDLING, set by the trainer when unset)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda when available."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(
                f"train.offload_params={self.offload_params} needs train.zero_stage=3 "
                f"(got {self.zero_stage})"
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage 1, 2 or 3 (got 0)")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise ValueError("train.nvme_path must be set when offloading to nvme")
        self._check_zero()
        self._check_model_parallel()
        return self

    def _check_model_parallel(self) -> None:
        """Sequence, pipeline and tensor parallelism: the combinations DeepSpeed 0.19 cannot run are
        refused with its reason; those this project has not verified, with that reason."""
        pp, tp, sp = self.pipeline_stages, self.tensor_parallel, self.sequence_parallel
        kinds = [f"train.{name}={value}" for name, value in
                 (("sequence_parallel", sp), ("pipeline_stages", pp), ("tensor_parallel", tp)) if value > 1]
        if len(kinds) > 1:
            raise ValueError(
                f"{' with '.join(kinds)} is not supported: DeepSpeed's pipeline engine takes its own process "
                "grid as the only model-parallel unit, AutoTP installs another, and Ulysses needs its "
                "sequence-parallel unit, so no two of them compose in DeepSpeed 0.19; keep one of them > 1 "
                "(each composes with data parallelism)")
        for key in kinds:  # what none of them was verified with
            if self.offload_optimizer != "none" or self.offload_params != "none":
                raise ValueError(f"{key} is not supported with ZeRO-Offload (not verified): set "
                                 "train.offload_optimizer=none and train.offload_params=none")
            if self.compile:
                raise ValueError(f"{key} is not supported with train.compile=true (collectives inside the "
                                 "compiled blocks were not verified): set train.compile=false")
            if self.zero.zero_hpz_partition_size > 1:
                raise ValueError(f"{key} is not supported with train.zero.zero_hpz_partition_size > 1 (hpZ's "
                                 "secondary partition over model-parallel ranks was not verified): set it to 1")
        if pp > 1 and self.zero_stage > 1:
            raise ValueError(f"train.pipeline_stages={pp} needs train.zero_stage=1 (got {self.zero_stage}): "
                             "DeepSpeed's pipeline engine refuses ZeRO-2 and ZeRO-3, which partition gradients "
                             "that the pipeline accumulates over micro batches")
        if tp > 1 and self.zero_stage == 3:
            raise ValueError(f"train.tensor_parallel={tp} needs train.zero_stage 1 or 2 (got 3): AutoTP with "
                             "ZeRO-3 trains (2 CPU ranks gave the 1-rank losses), but the model directory cannot "
                             "be written from its checkpoints yet (ZeRO-3 partitions of the tensor-parallel "
                             "shards); use ZeRO-1/2 with tensor parallelism (its weights are already split T ways)")
        if (pp > 1 or tp > 1) and self.zero_stage == 0:
            key, stages = ((f"train.pipeline_stages={pp}", "1") if pp > 1 else (f"train.tensor_parallel={tp}", "1 or 2"))
            raise ValueError(f"{key} needs train.zero_stage {stages} (got 0): without ZeRO the torch optimizer clips "
                             "by the gradient norm of this rank's own layers or shards alone, which differs between "
                             "the ranks of a model-parallel group; set train.zero_stage=1")

    def _check_zero(self) -> None:
        for name in self.zero.changed():
            if name not in ZERO_KEYS_BY_STAGE[self.zero_stage]:
                stages = sorted(s for s, keys in ZERO_KEYS_BY_STAGE.items() if name in keys)
                raise ValueError(
                    f"train.zero.{name}={getattr(self.zero, name)} applies only to train.zero_stage "
                    f"{' or '.join(map(str, stages))} (got {self.zero_stage}); remove it or change the stage")


class CheckpointConfig(Section):
    """Checkpointing and resume (section ``checkpoint``)."""

    every: int = Field(100, ge=0)
    """Save every N steps (0: only at the end)."""
    keep_last: int = Field(2, gt=0)
    """Keep the newest K complete checkpoints."""
    resume: Literal["auto", "never"] | str = "auto"
    """auto: newest usable checkpoint in the run directory (damaged ones are skipped with a
    warning); never: start fresh; or one checkpoint of this run (its path or ``step_NNNNNNNN``),
    which must be whole. DeepSpeed's files are pickles, so no other directory's are loaded."""
    write_model_dir: Literal["end", "every_save", "never"] = "end"
    """When rank 0 consolidates a checkpoint's model directory (``<ckpt>/model``: safetensors
    shards + config + tokenizer) from the shards just saved, one tensor at a time: end: after the
    run's final save, with no rank waiting on it; every_save: after every save (the other ranks
    wait for it at their next collective, so it must take less than train.collective_timeout_s);
    never: only on demand (``launcher/consolidate.py``, or any tool given the run or checkpoint
    directory). Saves themselves never gather the model. true/false mean every_save/never."""

    @field_validator("write_model_dir", mode="before")
    @classmethod
    def _model_dir_bool(cls, value: object) -> object:
        return {True: "every_save", False: "never"}[value] if isinstance(value, bool) else value


class LogConfig(Section):
    """Console, file and TensorBoard logging (section ``log``)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level of rank 0."""
    every: int = Field(10, gt=0)
    """Log training metrics every N steps."""
    all_ranks: bool = False
    """Print from every rank, not only rank 0."""
    rank_files: bool = True
    """Each rank also logs everything to <run_dir>/logs/rank<N>.log."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tensorboard."""
    peak_tflops: float | None = Field(None, gt=0)
    """Device peak for MFU in TFLOP/s (default: known GPU table, or a measured GEMM peak on CPU)."""
    loss_spike_factor: float = Field(3.0, gt=1)
    """Log a warning when the loss exceeds this multiple of its running mean."""


class HarnessConfig(Section):
    """Downstream evaluation during pretraining with lm-evaluation-harness (section ``harness``):
    rank 0 scores the model being trained while the other ranks wait at the next collective."""

    tasks: list[str] = Field(default_factory=list)
    """Harness task or group names to run (empty: none): the bundled data/sample/eval tasks (crucible_sentiment, crucible_udhr_completion), task YAML files in harness.include_path, or standard tasks (their data from the Hugging Face hub or its cache). Scalars eval/<task>/<metric> go to metrics.jsonl and TensorBoard, the harness's results JSON to <run_dir>/eval/step_NNNNNNNN/."""
    every: int = Field(0, ge=0)
    """Run the tasks every N steps and after the last step (0: only after the last step)."""
    limit: float | None = Field(None, gt=0)
    """Items per task: a count, or a fraction below 1 (null: all). Keep an evaluation well under train.collective_timeout_s: the other ranks wait for it."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per item (null: each task's own setting)."""
    include_path: list[str] = Field(default_factory=list)
    """Folders of your own task YAML files (the harness's format; a JSON/JSONL data file works offline)."""
    batch_size: int = Field(16, gt=0)
    """Sequences per forward pass of the evaluation."""


class PretrainConfig(Section):
    """Root config of ``launcher/pretrain.py``."""

    run_dir: str = "runs/pretrain"
    """Run directory: checkpoints, logs, TensorBoard, model directories."""
    init_from: str | None = None
    """Continue pretraining from existing weights (null: random init): a model directory, a Hugging Face Llama directory (config.json + safetensors) or another run's directory or checkpoint (its newest whole model). Only the weights are taken: the optimizer state, the learning-rate schedule and the data position start fresh. The architecture is the source's (shape keys set in the model section, or its preset, must agree, else the differing ones are named; the rotary base and scaling may change, as for context extension; training keys such as activation_checkpointing are the recipe's); the token shards must be written with the source's tokenizer. Applies to a fresh start only: a run directory that has a checkpoint resumes from it. The run directory records the source in init_from.json (and every checkpoint's trainer_state.json)."""
    data: LoaderConfig = Field(default_factory=LoaderConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    harness: HarnessConfig = Field(default_factory=HarnessConfig)

    @model_validator(mode="after")
    def _check_harness(self) -> PretrainConfig:
        train = self.train
        for name in ("sequence_parallel", "pipeline_stages", "tensor_parallel"):
            if self.harness.tasks and getattr(train, name) > 1:
                raise ValueError(
                    f"harness.tasks needs train.{name}=1: the harness scores whole sequences with the whole "
                    "model on each rank; evaluate a saved checkpoint with launcher/evaluate.py instead")
        if self.harness.tasks and self.train.zero_stage == 3:
            raise ValueError(
                "harness.tasks needs train.zero_stage 0, 1 or 2: under ZeRO-3 each rank holds only a "
                "slice of the weights; evaluate a saved checkpoint with launcher/evaluate.py instead")
        return self

    @model_validator(mode="after")
    def _check_phases(self) -> PretrainConfig:
        late = [p.start_step for p in self.data.phases if p.start_step is not None and p.start_step >= self.train.max_steps]
        if late:
            raise ValueError(
                f"data.phases start at step {late[0]}, not before train.max_steps={self.train.max_steps}: "
                "the phase would never train; start it earlier or raise train.max_steps")
        return self

