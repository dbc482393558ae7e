"""Language modelling (pretraining): the Transformer on packed token shards, next-token loss."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from crucible.errors import DataError, UserError
from crucible.fileio import sha256_file
from crucible.provenance import provenance
from data_pipeline.loader.evaluation import build_eval_loader
from data_pipeline.loader.phases import build_train_stream
from data_pipeline.shards.manifest import MANIFEST_FILE, is_url
from data_pipeline.tokenizer.byte_lengths import token_byte_lengths
from data_pipeline.tokenizer.folder import MODEL_FILE, load_sentencepiece
from model.compile import compile_blocks
from model.config import ModelConfig, max_seq_len_is_explicit, resolve_model_config
from model.io import save_model_dir
from model.transformer import Transformer, build_transformer
from training.collectives import gather_objects, sum_over_ranks
from training.config import PretrainConfig
from training.deepspeed_config import BatchPlan
from training.engine import DistContext, build_engine, partitioned_init
from training.init_model import (
    InitSource,
    check_tokenizer,
    find_init_source,
    init_model_config,
    load_init_weights,
    read_record_of_run,
    source_record,
    weight_file_hashes,
    write_record,
)
from training.metrics import model_state_bytes
from training.optim import build_optimizer, param_groups
from training.parallel import (
    Layout,
    check_model_parallel,
    check_sequence_parallel,
    initialize_sequence_parallel,
)
from training.steps.base import StepModule, StepOutput

log = logging.getLogger("crucible.training.language_model")

DATA_RECIPES = Path("configs") / "data"


def model_config_for(cfg: PretrainConfig, vocab_size: int, seq_len: int,
                     eos_id: int | None = None) -> ModelConfig:
    """The recipe's model config with the shards' vocabulary and context.

    ``model.max_seq_len`` left to the preset (or default) grows to the shards' ``seq_len`` when
    that is longer; one set explicitly (recipe or command line) that cannot hold the shards'
    sequences is refused. With ``model.attention: document``, ``model.eos_id`` left null becomes
    the shards' tokenizer's EOS id (``eos_id``); one set to another id is refused.
    """
    model_cfg = resolve_model_config(cfg.model, vocab_size=vocab_size, seq_len=seq_len)
    if model_cfg.attention == "document" and eos_id is not None:
        if model_cfg.eos_id is None:
            model_cfg = ModelConfig.model_validate({**model_cfg.model_dump(), "eos_id": eos_id})
        elif model_cfg.eos_id != eos_id:
            raise UserError(
                f"model.eos_id is {model_cfg.eos_id} but the token shards end their documents with "
                f"the tokenizer's EOS id {eos_id}; leave model.eos_id out (null) to take it")
    if model_cfg.max_seq_len < seq_len:
        raise UserError(
            f"the token shards hold sequences of {seq_len} tokens but model.max_seq_len is set to "
            f"{model_cfg.max_seq_len}; set model.max_seq_len={seq_len} (or leave it out to take the "
            f"shards' length), or shard with shard.seq_len<={model_cfg.max_seq_len}"
        )
    if not max_seq_len_is_explicit(cfg.model) and model_cfg.max_seq_len != resolve_model_config(cfg.model).max_seq_len:
        log.info("model.max_seq_len %d, the token shards' seq_len (not set; %s: %d)", model_cfg.max_seq_len,
                 f"preset {cfg.model.preset}" if cfg.model.preset else "default", cfg.model.max_seq_len)
    return model_cfg


def build_command(manifest: str) -> str:
    """The command that writes ``manifest``: ``prepare_data`` for ``<out>/shards/manifest.json``
    (with the data recipe whose cleaning output is ``<out>/clean``, when there is one), else
    ``shard.py`` into the manifest's folder."""
    path = Path(manifest)
    folder = path.parent if path.name == MANIFEST_FILE else path
    recipe = "configs/data/<data recipe>.yaml"
    if folder.name == "shards":
        out = folder.parent
        for candidate in sorted(DATA_RECIPES.glob("*.yaml")):
            try:
                output = (yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}).get("output")
            except (OSError, ValueError):
                continue
            if output and Path(str(output)) == out / "clean":
                recipe = candidate.as_posix()
                break
        return f"python launcher/prepare_data.py --config {recipe} output={out.as_posix()}"
    return (f"python launcher/shard.py --config {recipe} input=<clean dir> tokenizer_dir=<tokenizer dir> "
            f"output={folder.as_posix()}")


def require_manifests(manifests: list[str]) -> None:
    """Refuse missing local manifests with one line naming every one and the command that
    builds the first (URLs are left to the loader)."""
    missing = [m for m in manifests if not is_url(m) and not Path(m).exists()]
    if not missing:
        return
    names = ", ".join(missing)
    raise DataError((f"data.manifests: {names} does not exist" if len(missing) == 1 else
                     f"data.manifests: {len(missing)} manifests do not exist: {names}")
                    + f"; build the token shards with `{build_command(missing[0])}`, or set "
                    "data.manifests=[<path to your shards' manifest.json>]")


def tokenizer_sha256(loader: Any) -> str | None:
    tok = getattr(loader, "tokenizer", None) or {}
    return tok.get("sha256") or tok.get("model_sha256")


def tokenizer_source_dir(loader: Any, manifest_path: str) -> Path | None:
    """The tokenizer folder named by the manifest (absolute, or relative to the manifest)."""
    tok = getattr(loader, "tokenizer", None) or {}
    for key in ("dir", "path", "tokenizer_dir"):
        if tok.get(key):
            path = Path(tok[key])
            if not path.is_absolute():
                path = Path(manifest_path).parent / path
            if path.is_file():
                path = path.parent
            return path if path.is_dir() else None
    return None


def build_language_model(model_cfg: ModelConfig, ds_config: dict[str, Any], seed: int,
                         device: torch.device, mpu: Any = None) -> Transformer:
    """The Transformer with its fp32 initial weights, never whole in host memory: under ZeRO-3
    built inside ``deepspeed.zero.Init`` (partitioned as it is created), otherwise on the meta
    device and materialised on the training device. The same seed gives the same weights on
    every device and ZeRO stage. ``mpu``: the sequence-parallel groups, if any."""
    if ds_config["zero_optimization"]["stage"] == 3:
        torch.manual_seed(seed)
        with partitioned_init(ds_config, mpu):
            return Transformer(model_cfg)
    return build_transformer(model_cfg, device=device, seed=seed, dtype=torch.float32)


def next_token_sums(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                    byte_lengths: torch.Tensor | None) -> torch.Tensor:
    """(3,) float64: the summed next-token cross-entropy in nats of the rows ``keep`` of
    ``logits`` (B, T, V) against ``targets`` (B, T), their number of target tokens, and the UTF-8
    bytes those targets decode to (``byte_lengths``: bytes per token id; None: 0). Computed in
    fp32 one row at a time, so only one row's logits are upcast at once."""
    row_nats = torch.stack([F.cross_entropy(logits[r].float(), targets[r], reduction="sum")
                            for r in range(targets.shape[0])]).double()  # (B,)
    kept = targets[keep]  # (rows kept, T)
    nbytes = byte_lengths[kept].sum() if byte_lengths is not None else 0
    return torch.stack([row_nats[keep].sum(), torch.tensor(float(kept.numel()), dtype=torch.float64,
                                                           device=logits.device),
                        torch.as_tensor(nbytes, dtype=torch.float64, device=logits.device)])


def sequence_parallel_backward_scale(zero_stage: int, sequence_parallel: int) -> int:
    """The factor on the loss each rank backpropagates so that DeepSpeed's gradient reduction
    gives the gradient of the full-sequence mean. Each rank's loss is its chunk's share of the
    mean (see :meth:`model.transformer.Transformer.forward`), so the group's gradients must be
    summed: ZeRO 0-2 sum over the sequence-parallel ranks (and average over data-parallel ones);
    ZeRO-3's reduce-scatter averages over all of them (DeepSpeed 0.19 applies its
    sequence-parallel correction on another path only), so the loss is multiplied by the group size."""
    return sequence_parallel if zero_stage == 3 else 1


def validation_metrics(prefix: str, names: list[str], nats: list[float], tokens: list[float],
                       nbytes: list[float] | None) -> dict[str, float]:
    """Validation metrics from per-source sums of next-token cross-entropy (``nats``), target
    tokens and the UTF-8 bytes those tokens decode to (``nbytes``; None: unknown).

    Per source: ``<prefix>/<source>/loss`` (nats per token) and ``<prefix>/<source>/bits_per_byte``
    (``nats / ln 2 / bytes``); over all sources: ``<prefix>/loss``, the token-weighted mean of the
    sources' losses (total nats over total tokens), ``<prefix>/perplexity`` and
    ``<prefix>/bits_per_byte`` (total nats / ln 2 / total bytes). A source with no token counted
    is left out. Bits per byte do not depend on the tokenizer: they compare runs with different
    vocabularies.
    """
    out: dict[str, float] = {}
    for s, name in enumerate(names):
        if tokens[s] > 0:
            out[f"{prefix}/{name}/loss"] = nats[s] / tokens[s]
            if nbytes is not None and nbytes[s] > 0:
                out[f"{prefix}/{name}/bits_per_byte"] = nats[s] / math.log(2) / nbytes[s]
    total_tokens = sum(tokens)
    if total_tokens == 0:
        return {}
    loss = sum(nats) / total_tokens
    out[f"{prefix}/loss"] = loss
    out[f"{prefix}/perplexity"] = math.exp(min(loss, 80.0))
    if nbytes is not None and sum(nbytes) > 0:
        out[f"{prefix}/bits_per_byte"] = sum(nats) / math.log(2) / sum(nbytes)
    return out


class LanguageModelStep(StepModule):
    """Next-token cross-entropy over packed sequences (no padding); validation loss, perplexity
    and bits per byte per source (each manifest's validation split) and over all of them.

    With ``init_from`` the model is the source's architecture with its weights at a fresh start
    (see :mod:`training.init_model`); a resumed run loads its own checkpoint instead."""

    supports_model_parallel: tuple[str, ...] = ("sequence_parallel", "tensor_parallel")
    """``train.sequence_parallel`` > 1 splits each sample's sequence, ``train.tensor_parallel`` > 1
    each block's weights (see :mod:`training.parallel`); pipelines run in :mod:`training.steps.pipeline`."""

    resuming: bool = False
    """Set by the loop before :meth:`build_engine`: a checkpoint of this run will be loaded, so
    the ``init_from`` weights are not."""

    def __init__(self, cfg: PretrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        sp = cfg.train.sequence_parallel
        self.layout = Layout.of(ctx.rank, ctx.world_size, cfg.train)  # divides, or a ConfigError
        self.sp_group: Any = None
        self.backward_scale = sequence_parallel_backward_scale(cfg.train.zero_stage, sp)
        self.run_dir = Path(cfg.run_dir)
        self.init_source: InitSource | None = None
        self.init_record: dict[str, Any] | None = None
        self.model_state_gb: float | None = None
        self._val_warned = False
        self._byte_lengths: torch.Tensor | None = None
        self._bytes_warned = False

    def prepare(self, plan: BatchPlan) -> Any:
        if not self.cfg.data.manifests:
            raise DataError(
                "data.manifests is empty: list the manifest.json of your token shards "
                "(written by launcher/shard.py), e.g. data.manifests=[runs/shards/manifest.json]"
            )
        require_manifests(self.cfg.data.all_manifests())
        planned = self.cfg.train.planned_world_size
        if planned is not None and planned != self.ctx.world_size:
            log.info("the recipe is planned for %d ranks and runs on %d: gradient accumulation %d, global "
                     "batch %d", planned, self.ctx.world_size, plan.grad_accum_steps, plan.global_batch_size)
        layout = self.layout  # the ranks of a sequence-parallel group read the same samples
        self.loader = build_train_stream(self.cfg.data, plan.micro_batch_size, layout.data_parallel_rank,
                                         layout.data_parallel_size, plan.global_batch_size, self.cfg.train.max_steps)
        self.seq_len = int(self.loader.seq_len)
        eos_id = (getattr(self.loader, "tokenizer", None) or {}).get("eos_id")
        self.tokenizer_sha256 = tokenizer_sha256(self.loader)
        self.tokenizer_dir = tokenizer_source_dir(self.loader, self.cfg.data.manifests[0])
        recipe, vocab_size = self.cfg, int(self.loader.vocab_size)
        if self.cfg.init_from:  # the source's architecture and vocabulary (maybe padded past the shards')
            source = self.init_source = find_init_source(self.cfg.init_from)
            check_tokenizer(source, self.tokenizer_sha256, vocab_size, self.cfg.data.manifests[0])
            start_cfg = init_model_config(self.cfg.model, source, self.seq_len)
            recipe, vocab_size = self.cfg.model_copy(update={"model": start_cfg}), start_cfg.vocab_size
            self.tokenizer_dir = self.tokenizer_dir or source.model_dir
        self.model_cfg = model_config_for(recipe, vocab_size, self.seq_len,
                                          eos_id=None if eos_id is None else int(eos_id))
        self.run_config = self.cfg.model_copy(update={"model": self.model_cfg})
        mc = self.model_cfg
        check_sequence_parallel(layout.sequence_parallel, self.seq_len, mc.n_heads, mc.kv_heads)
        check_model_parallel(self.cfg.train, mc.n_layers, mc.n_heads, mc.kv_heads, mc.hidden_dim)
        train = self.cfg.train
        # the recipe's planned ranks, whatever the layout: the same sequences with or without sequence parallelism
        self.eval_samples = train.eval_batches * plan.micro_batch_size * (train.planned_world_size
                                                                           or plan.data_parallel_size)
        return self.loader

    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
        mpu = None
        if self.layout.sequence_parallel > 1:  # groups first: ZeRO-3 partitions over them while building
            mpu, self.sp_group = initialize_sequence_parallel(self.layout.sequence_parallel)
        model = build_language_model(self.model_cfg, ds_config, self.cfg.train.seed, self.ctx.device, mpu)
        if mpu is not None:
            model.enable_sequence_parallel(self.sp_group)
        if self.init_source is not None:
            self._start_from_source(model, ds_config["zero_optimization"]["stage"] == 3)
        if self.cfg.train.compile:
            compile_blocks(model, dynamic=False)  # the training batch shape is fixed
        optim = self.cfg.optim
        groups = param_groups(model, optim)
        optimizer = (None if optim.implementation == "deepspeed"
                     else build_optimizer(groups, optim, ds_config["zero_optimization"]["stage"]))
        self.engine, self.optimizer = build_engine(model, ds_config, optimizer, model_parameters=groups, mpu=mpu)
        return self.engine, self.optimizer

    def _start_from_source(self, model: torch.nn.Module, partitioned: bool,
                           params: dict[str, torch.nn.Parameter] | None = None) -> None:
        """At a fresh start: the ``init_from`` weights into ``model`` (before DeepSpeed copies
        them into its optimizer; ``params``: its parameters by Transformer name when they are
        named otherwise), recorded in ``init_from.json`` by rank 0. Resuming: nothing is
        loaded (the run's checkpoint follows) and the record written at the start is kept."""
        if self.resuming:
            log.info("resuming from this run's checkpoint: init_from=%s is not loaded", self.cfg.init_from)
            self.init_record = read_record_of_run(self.run_dir)
            return
        load_init_weights(model, self.init_source, partitioned, self.ctx.rank, params)
        ctx = self.ctx
        shares = gather_objects(weight_file_hashes(self.init_source, ctx.rank, ctx.world_size), ctx.world_size)
        if ctx.rank == 0:  # writes trainer_state.json, which carries the record
            self.init_record = source_record(self.init_source, {k: v for part in shares for k, v in part.items()})
            write_record(self.run_dir, self.init_record)

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) of the micro batch ``tokens`` (B, T + 1), computed
        inside the model's forward (so ZeRO-3 has the output head gathered), in chunks of
        ``train.loss_chunk_tokens`` tokens."""
        tokens = tokens.to(self.ctx.device, non_blocking=True)
        return self.engine(tokens[:, :-1], targets=tokens[:, 1:],
                           loss_chunk_tokens=self.cfg.train.loss_chunk_tokens)

    def train_step(self, batch: list[torch.Tensor], step: int) -> StepOutput:
        """Every micro batch holds the same number of tokens (packed, no padding), so the mean
        of the micro-batch means over steps and ranks is the per-token mean.

        Sequence parallel: each rank backpropagates its chunk's share of the micro batch's mean
        (DeepSpeed sums the gradients of a group's ranks) and reports the group's sum, the mean
        over the whole sequence; tokens are this rank's chunk, so the sum over ranks counts each
        token once."""
        extra: dict[str, float] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)  # read by the loop
        for micro, tokens in enumerate(batch):
            loss = self._loss(tokens)
            self.engine.backward(loss * self.backward_scale)
            if self.model_state_gb is None and step >= 1 and micro == len(batch) - 1:
                # weights + gradients + optimizer state held by this rank (ZeRO shards counted),
                # at the gradient peak of the second step (AdamW creates its state lazily in
                # the first): after the last backward, before the optimizer step
                self.model_state_gb = extra["memory/model_state_gb"] = model_state_bytes(self.engine) / 1024**3
            self.engine.step()
            loss_sum += self._group_sum(loss.detach().double())
        tokens = sum(t.shape[0] * (t.shape[1] - 1) for t in batch) // self.layout.model_parallel  # counted once per group
        return StepOutput(loss_sum, float(len(batch)), tokens, extra)

    def _group_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over this rank's sequence-parallel group (itself without one)."""
        if self.sp_group is None:
            return value
        return sum_over_ranks(value, value.device, group=self.sp_group)

    def evaluate(self) -> dict[str, float] | None:
        """Validation during training (``val/...``, see :func:`validation_metrics`) on a fixed
        subset: ``train.eval_batches`` x micro batch x planned ranks (``train.planned_world_size``,
        else this run's) sequences shared evenly over the sources, the first of each source's
        validation split; the same sequences at every evaluation and on any number of ranks."""
        return self._validate("val", self.eval_samples)

    def evaluate_full(self) -> dict[str, float] | None:
        """Called by the trainer once at the end of the run: every sequence of every source's
        validation split (``val_full/...``), when ``train.eval_full_at_end``."""
        return self._validate("val_full", None) if self.cfg.train.eval_full_at_end else None

    def _validate(self, prefix: str, max_samples: int | None) -> dict[str, float] | None:
        """Summed next-token cross-entropy (nats), target tokens and their UTF-8 bytes per source
        over this rank's share of the evaluated sequences, summed over ranks in one all-reduce.

        The loss is computed from the logits row by row (the last micro batch of a source has
        rows to leave out, and its shape must stay the training shape: compiled blocks and ZeRO-3
        run every rank's forward passes together), so an evaluation holds one micro batch's
        (tokens x vocabulary) logits in the model dtype.
        """
        try:
            loader = build_eval_loader(self.cfg.data, self.cfg.train.micro_batch_size, self.layout.data_parallel_rank,
                                       self.layout.data_parallel_size, split="validation", max_samples=max_samples)
        except DataError as exc:
            if not self._val_warned:
                log.warning("no validation: %s", exc)
                self._val_warned = True
            return None
        device = self.ctx.device
        byte_lengths = self._token_byte_lengths()
        # per source: nats, target tokens, target bytes; then 1 per rank that counted bytes
        sums = torch.zeros(3 * len(loader.names) + 1, dtype=torch.float64, device=device)
        sums[-1] = float(byte_lengths is not None)
        self.engine.eval()
        with torch.no_grad():
            for batch in loader:
                found = self._micro_batch_sums(batch.tokens.to(device, non_blocking=True), batch.keep.to(device),
                                               byte_lengths)
                if found is not None:
                    sums[3 * batch.source:3 * batch.source + 3] += found
        self.engine.train()
        if self.layout.tensor_parallel_rank:  # the ranks of a tensor-parallel group saw the same sequences
            sums[:-1] = 0
        totals = sum_over_ranks(sums, device).cpu()
        with_bytes = int(totals[-1]) == self.ctx.world_size  # every rank has the tokenizer
        per_source = totals[:-1].view(-1, 3)
        return validation_metrics(prefix, loader.names, per_source[:, 0].tolist(), per_source[:, 1].tolist(),
                                  per_source[:, 2].tolist() if with_bytes else None)

    def _micro_batch_sums(self, tokens: torch.Tensor, keep: torch.Tensor,
                          byte_lengths: torch.Tensor | None) -> torch.Tensor | None:
        """:func:`next_token_sums` of one validation micro batch ``tokens`` (B, T + 1) on this rank
        (sequence parallel: its chunk's tokens), or None when this rank counts none of it."""
        logits = self.engine(tokens[:, :-1])  # (B, T, V); sequence parallel: this rank's chunk
        targets = tokens[:, 1:]
        if self.sp_group is not None:  # each rank counts its chunk's tokens, each once
            targets = targets[:, self.engine.module.sequence_chunk(targets.shape[1])]
        return next_token_sums(logits, targets, keep, byte_lengths)

    def _token_byte_lengths(self) -> torch.Tensor | None:
        """UTF-8 bytes per token id (:func:`token_byte_lengths`) on the device, from the shards'
        tokenizer (the manifest's folder, else the run directory's copy) when its sha256 is the
        manifest's; None, with one warning, when there is no such tokenizer (no bits per byte)."""
        if self._byte_lengths is None and not self._bytes_warned:
            for folder in (self.tokenizer_dir, self.run_dir / "tokenizer"):
                model_file = folder / MODEL_FILE if folder is not None else None
                if model_file is None or not model_file.is_file():
                    continue
                if self.tokenizer_sha256 and sha256_file(model_file) != self.tokenizer_sha256:
                    continue
                table = token_byte_lengths(load_sentencepiece(folder), self.model_cfg.vocab_size)
                self._byte_lengths = torch.from_numpy(table).to(self.ctx.device)
                break
            else:
                log.warning("no val/bits_per_byte: the tokenizer the token shards were written with "
                            "(sha256 %s) is neither in %s nor in %s", self.tokenizer_sha256,
                            self.tokenizer_dir, self.run_dir / "tokenizer")
                self._bytes_warned = True
        return self._byte_lengths

    def client_state(self) -> dict[str, Any]:
        """Adds the manifests' checksums and, for a run started with ``init_from``, its record
        (rank 0, which writes ``trainer_state.json``)."""
        return {**super().client_state(),
                "manifest_sha256s": list(getattr(self.loader, "manifest_sha256s", [])),
                **({"init_from": self.init_record} if self.init_record is not None else {})}

    def save_model_dir(self, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        tok = self.run_dir / "tokenizer"
        save_model_dir(out, state_dict, self.model_cfg, tokenizer_dir=tok if tok.is_dir() else None,
                       provenance=provenance(self.run_config))
