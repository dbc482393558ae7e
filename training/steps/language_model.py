"""Language modelling (pretraining): the Transformer on packed token shards, next-token loss."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from crucible.errors import DataError, UserError
from crucible.provenance import provenance
from data_pipeline.loader.evaluation import build_eval_loader
from data_pipeline.loader.train import build_train_loader
from data_pipeline.shards.manifest import MANIFEST_FILE, is_url
from model.compile import compile_blocks
from model.config import ModelConfig, max_seq_len_is_explicit, resolve_model_config
from model.io import save_model_dir
from model.transformer import Transformer, build_transformer
from training.collectives import sum_over_ranks
from training.config import PretrainConfig
from training.deepspeed_config import BatchPlan
from training.engine import DistContext, build_engine, partitioned_init
from training.metrics import model_state_bytes
from training.optim import build_optimizer, param_groups
from training.steps.base import StepModule, StepOutput

log = logging.getLogger("crucible.training.language_model")

DATA_RECIPES = Path("configs") / "data"


def model_config_for(cfg: PretrainConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    """The recipe's model config with the shards' vocabulary and context.

    ``model.max_seq_len`` left to the preset (or default) grows to the shards' ``seq_len`` when
    that is longer; one set explicitly (recipe or command line) that cannot hold the shards'
    sequences is refused.
    """
    model_cfg = resolve_model_config(cfg.model, vocab_size=vocab_size, seq_len=seq_len)
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
                         device: torch.device) -> Transformer:
    """The Transformer with its fp32 initial weights, never whole in host memory: under ZeRO-3
    built inside ``deepspeed.zero.Init`` (partitioned as it is created), otherwise on the meta
    device and materialised on the training device. The same seed gives the same weights on
    every device and ZeRO stage."""
    if ds_config["zero_optimization"]["stage"] == 3:
        torch.manual_seed(seed)
        with partitioned_init(ds_config):
            return Transformer(model_cfg)
    return build_transformer(model_cfg, device=device, seed=seed, dtype=torch.float32)


class LanguageModelStep(StepModule):
    """Next-token cross-entropy over packed sequences (no padding), validation loss and
    perplexity on the manifests' validation splits."""

    def __init__(self, cfg: PretrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.run_dir)
        self.model_state_gb: float | None = None
        self._val_warned = False

    def prepare(self, plan: BatchPlan) -> Any:
        if not self.cfg.data.manifests:
            raise DataError(
                "data.manifests is empty: list the manifest.json of your token shards "
                "(written by launcher/shard.py), e.g. data.manifests=[runs/shards/manifest.json]"
            )
        require_manifests(self.cfg.data.manifests)
        planned = self.cfg.train.planned_world_size
        if planned is not None and planned != plan.data_parallel_size:
            log.info("the recipe is planned for %d ranks and runs on %d: gradient accumulation %d, global "
                     "batch %d", planned, plan.data_parallel_size, plan.grad_accum_steps, plan.global_batch_size)
        self.loader = build_train_loader(self.cfg.data, plan.micro_batch_size, self.ctx.rank, self.ctx.world_size)
        self.seq_len = int(self.loader.seq_len)
        self.model_cfg = model_config_for(self.cfg, int(self.loader.vocab_size), self.seq_len)
        self.run_config = self.cfg.model_copy(update={"model": self.model_cfg})
        self.tokenizer_sha256 = tokenizer_sha256(self.loader)
        self.tokenizer_dir = tokenizer_source_dir(self.loader, self.cfg.data.manifests[0])
        return self.loader

    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
        model = build_language_model(self.model_cfg, ds_config, self.cfg.train.seed, self.ctx.device)
        if self.cfg.train.compile:
            compile_blocks(model, dynamic=False)  # the training batch shape is fixed
        optim = self.cfg.optim
        groups = param_groups(model, optim)
        optimizer = (None if optim.implementation == "deepspeed"
                     else build_optimizer(groups, optim, ds_config["zero_optimization"]["stage"]))
        self.engine, self.optimizer = build_engine(model, ds_config, optimizer, model_parameters=groups)
        return self.engine, self.optimizer

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) of the micro batch ``tokens`` (B, T + 1), computed
        inside the model's forward (so ZeRO-3 has the output head gathered), in chunks of
        ``train.loss_chunk_tokens`` tokens."""
        tokens = tokens.to(self.ctx.device, non_blocking=True)
        return self.engine(tokens[:, :-1], targets=tokens[:, 1:],
                           loss_chunk_tokens=self.cfg.train.loss_chunk_tokens)

    def train_step(self, batch: list[torch.Tensor], step: int) -> StepOutput:
        """Every micro batch holds the same number of tokens (packed, no padding), so the mean
        of the micro-batch means over steps and ranks is the per-token mean."""
        extra: dict[str, float] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)  # read by the loop
        for micro, tokens in enumerate(batch):
            loss = self._loss(tokens)
            self.engine.backward(loss)
            if self.model_state_gb is None and step >= 1 and micro == len(batch) - 1:
                # weights + gradients + optimizer state held by this rank (ZeRO shards counted),
                # at the gradient peak of the second step (AdamW creates its state lazily in
                # the first): after the last backward, before the optimizer step
                self.model_state_gb = extra["memory/model_state_gb"] = model_state_bytes(self.engine) / 1024**3
            self.engine.step()
            loss_sum += loss.detach().double()
        tokens = sum(t.shape[0] * (t.shape[1] - 1) for t in batch)
        return StepOutput(loss_sum, float(len(batch)), tokens, extra)

    def evaluate(self) -> dict[str, float] | None:
        """Mean per-token validation loss over ``train.eval_batches`` micro batches per rank."""
        try:
            batches = build_eval_loader(self.cfg.data, self.cfg.train.micro_batch_size,
                                        self.ctx.rank, self.ctx.world_size, split="validation")
        except DataError as exc:
            if not self._val_warned:
                log.warning("no validation: %s", exc)
                self._val_warned = True
            return None
        self.engine.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        count = 0
        with torch.no_grad():
            for i, tokens in enumerate(batches):
                if i >= self.cfg.train.eval_batches:
                    break
                n = tokens[:, 1:].numel()
                loss_sum += self._loss(tokens).double() * n
                count += n
        self.engine.train()
        local = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=self.ctx.device)])
        total_loss, total_count = sum_over_ranks(local, self.ctx.device).tolist()
        if total_count == 0:
            return None
        val_loss = total_loss / total_count
        return {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 80.0))}

    def client_state(self) -> dict[str, Any]:
        return {**super().client_state(),
                "manifest_sha256s": list(getattr(self.loader, "manifest_sha256s", []))}

    def save_model_dir(self, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        tok = self.run_dir / "tokenizer"
        save_model_dir(out, state_dict, self.model_cfg, tokenizer_dir=tok if tok.is_dir() else None,
                       provenance=provenance(self.run_config))
