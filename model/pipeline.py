"""The Transformer as DeepSpeed pipeline layers (``deepspeed.pipe.PipelineModule``).

Layer ``i`` of the pipeline, in order (``L`` = ``n_layers``):

* ``0``: :class:`EmbedPipe` (token embedding);
* ``1 .. L``: :class:`BlockPipe` (block ``i - 1``);
* ``L + 1``: :class:`NormPipe` (final RMSNorm);
* ``L + 2``: the output head: :class:`HeadPipe` (its own weight), or with tied embeddings the
  embedding again (a ``TiedLayerSpec``: DeepSpeed keeps one copy on the first and one on the last
  stage and all-reduces their gradients).

The layers pass the hidden states (B, T, C) from stage to stage, with the tokens (B, T) beside
them under ``model.attention: document`` (each block rebuilds the document mask and positions
from them: only tensors cross stages). The last layer returns the final-normed hidden states and
the pipeline's ``loss_fn`` (:class:`NextTokenLoss`) computes the mean next-token cross-entropy
from them and the head's weight, in chunks of ``train.loss_chunk_tokens`` tokens, so no stage
holds (B, T, vocab) logits in training.

Weights: :func:`init_pipeline_weights` draws every parameter in the order and from the seeded
generator :func:`model.transformer.build_transformer` uses, each stage keeping its own layers
and drawing past the others', so a pipeline starts from exactly the weights of the same seed on
one rank (every rank draws the whole model's numbers once, as under ZeRO-3's partitioned init).
:func:`model_name` maps the pipeline's parameter names to the Transformer's (checkpoint
consolidation and export).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import (
    Block,
    Embedding,
    Linear,
    OutputHead,
    RMSNorm,
    document_inputs,
    next_token_loss,
    rotary_inputs,
)

Activations = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""Hidden states (B, T, C), with the tokens (B, T) under document attention."""

TIED_KEY = "embed"


class EmbedPipe(nn.Module):
    """Pipeline layer 0 (and the tied output head): the token embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.document = cfg.attention == "document"
        self.embed = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> Activations:
        x = self.embed(tokens)  # (B, T, C)
        return (x, tokens) if self.document else x


class BlockPipe(nn.Module):
    """One Transformer block; its rotary tables (and document mask) from the sequence it gets."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block = Block(cfg)

    def forward(self, inputs: Activations) -> Activations:
        x, tokens = inputs if isinstance(inputs, tuple) else (inputs, None)
        mask = None
        if tokens is None:
            positions = torch.arange(x.shape[1], device=x.device)
        else:
            mask, positions = document_inputs(self.cfg, tokens, x.dtype)
        cos, sin = rotary_inputs(self.cfg, positions, x.dtype)
        x = self.block(x, cos, sin, None, mask)
        return x if tokens is None else (x, tokens)


class NormPipe(nn.Module):
    """The final RMSNorm; drops the tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, inputs: Activations) -> torch.Tensor:
        return self.norm(inputs[0] if isinstance(inputs, tuple) else inputs)


class HeadPipe(nn.Module):
    """The untied output head: holds its weight; the loss function reads it (hidden states pass)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head = OutputHead(cfg.dim, cfg.vocab_size, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight


def _tied_head(module: EmbedPipe, x: torch.Tensor) -> torch.Tensor:
    """The tied head's place in the pipeline: the hidden states pass (the loss reads the weight)."""
    return x


def pipeline_layers(cfg: ModelConfig) -> list[Any]:
    """The layer specs of :class:`deepspeed.pipe.PipelineModule` (see the module docstring)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.tie_embeddings:
        first: Any = TiedLayerSpec(TIED_KEY, EmbedPipe, cfg, tied_weight_attr=["embed.weight"])
        head: Any = TiedLayerSpec(TIED_KEY, EmbedPipe, cfg, forward_fn=_tied_head, tied_weight_attr=["embed.weight"])
    else:
        first, head = LayerSpec(EmbedPipe, cfg), LayerSpec(HeadPipe, cfg)
    return [first, *(LayerSpec(BlockPipe, cfg) for _ in range(cfg.n_layers)), LayerSpec(NormPipe, cfg), head]


class NextTokenLoss:
    """The pipeline's ``loss_fn(hidden, targets)``: mean next-token cross-entropy of the last
    stage's hidden states through the head weight (``head_weight()``, the tied embedding or the
    head's own), in chunks of ``chunk_tokens`` (None or 0: full logits)."""

    def __init__(self, head_weight: Callable[[], torch.Tensor], chunk_tokens: int | None) -> None:
        self.head_weight, self.chunk_tokens = head_weight, chunk_tokens

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return next_token_loss(hidden, self.head_weight(), targets, self.chunk_tokens)


def head_weight_of(pipe: Any, cfg: ModelConfig) -> Callable[[], torch.Tensor]:
    """The last stage's output-head weight of ``pipe`` (read when the loss is computed)."""
    if cfg.tie_embeddings:
        return lambda: pipe.tied_modules[TIED_KEY].embed.weight
    index = cfg.n_layers + 2
    return lambda: getattr(pipe, str(index)).weight


def build_pipeline_module(cfg: ModelConfig, stages: int, data_parallel: int, seed: int,
                          loss_chunk_tokens: int | None, checkpoint_every: int = 0) -> Any:
    """The :class:`deepspeed.pipe.PipelineModule` of ``cfg`` over ``stages`` x ``data_parallel``
    ranks (DeepSpeed's ``PipeDataParallelTopology``: stage s on ranks ``[s D, (s + 1) D)``), blocks
    spread evenly over the stages, weights as :func:`init_pipeline_weights` (fp32), activation
    checkpointing every ``checkpoint_every`` layers (non-reentrant torch checkpoint; 0: off).
    Needs the process group."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    pipe = PipelineModule(
        layers=pipeline_layers(cfg), topology=PipeDataParallelTopology(num_pp=stages, num_dp=data_parallel),
        partition_method=f"type:{BlockPipe.__name__}", activation_checkpoint_interval=checkpoint_every,
        activation_checkpoint_func=partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))
    local = {index: pipe.tied_modules[TIED_KEY] if _is_tied(spec) else getattr(pipe, str(index))
             for index, spec in enumerate(pipe._layer_specs) if pipe._local_start <= index < pipe._local_stop}
    init_pipeline_weights(cfg, seed, local)
    pipe.loss_fn = NextTokenLoss(head_weight_of(pipe, cfg), loss_chunk_tokens)
    return pipe


def _is_tied(spec: Any) -> bool:
    return hasattr(spec, "key") and spec.key == TIED_KEY


def _layer_class(cfg: ModelConfig, index: int) -> type[nn.Module]:
    last = cfg.n_layers + 2
    if index == 0:
        return EmbedPipe
    if index <= cfg.n_layers:
        return BlockPipe
    if index == cfg.n_layers + 1:
        return NormPipe
    if index == last:
        return EmbedPipe if cfg.tie_embeddings else HeadPipe
    raise IndexError(f"pipeline layer {index} of a {cfg.n_layers}-block model (layers 0..{last})")


@torch.no_grad()
def init_pipeline_weights(cfg: ModelConfig, seed: int, local: dict[int, nn.Module]) -> None:
    """(Re)initialise the layers this stage holds (``local``: pipeline layer index -> module) with
    exactly the weights :func:`model.transformer.build_transformer` gives for ``seed``: one
    generator seeded once, every parameter drawn in the Transformer's order, the draws of layers
    held by other stages made into a scratch tensor and dropped. The tied head (last layer with
    tied embeddings) draws nothing, as in the Transformer."""
    head = cfg.n_layers + 2
    if cfg.tie_embeddings and head in local:  # the last stage's copy of the embedding
        local = {**local, 0: local[head]}
    torch.manual_seed(seed)
    scratch = torch.empty(0)
    for index in range(head if cfg.tie_embeddings else head + 1):
        module = local.get(index)
        if module is not None:
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            continue
        with torch.device("meta"):
            ghost = _layer_class(cfg, index)(cfg)
        for sub in ghost.modules():  # the same draws the real layer makes, in its order
            if isinstance(sub, (Linear, Embedding)) and not getattr(sub, "tied", False):
                numel = sub.weight.numel()
                if scratch.numel() < numel:
                    scratch = torch.empty(numel)
                scratch[:numel].normal_(0.0, sub.std)


_BLOCK_NAME = re.compile(r"^(\d+)\.block\.(.+)$")


def model_name(name: str, cfg: ModelConfig) -> str:
    """The Transformer's name of the pipeline parameter ``name`` (as ``PipelineModule``
    registers it: ``<layer index>.<path>`` or ``tied_modules.embed.<path>``)."""
    if name == f"tied_modules.{TIED_KEY}.embed.weight" or name == "0.embed.weight":
        return "embed.weight"
    if (m := _BLOCK_NAME.match(name)) and 1 <= int(m.group(1)) <= cfg.n_layers:
        return f"layers.{int(m.group(1)) - 1}.{m.group(2)}"
    if name == f"{cfg.n_layers + 1}.norm.weight":
        return "norm.weight"
    if name == f"{cfg.n_layers + 2}.head.weight" and not cfg.tie_embeddings:
        return "lm_head.weight"
    raise ValueError(f"{name!r} is not a parameter name of the {cfg.n_layers}-block pipeline")


def stage_parts(cfg: ModelConfig, stages: int) -> list[int]:
    """The first pipeline layer of each stage and the end (``stages + 1`` numbers), as
    ``PipelineModule``'s ``type:BlockPipe`` partition places them: blocks spread evenly, the
    embedding on the first stage, norm and head on the last."""
    from deepspeed.runtime.utils import partition_balanced

    return [int(p) for p in partition_balanced([0] + [1] * cfg.n_layers + [0, 0], stages)]


def stage_params(cfg: ModelConfig, stages: int) -> list[int]:
    """Parameters each stage holds (the last stage's copy of a tied embedding counted)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    block = cfg.dim * (2 * q + 2 * kv) + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim
    layers = [cfg.vocab_size * cfg.dim] + [block] * cfg.n_layers + [cfg.dim, cfg.vocab_size * cfg.dim]
    parts = stage_parts(cfg, stages)
    return [sum(layers[parts[s]:parts[s + 1]]) for s in range(stages)]


def stage_activation_bytes(cfg: ModelConfig, stages: int, grad_accum_steps: int, blocks_bytes: int,
                           block_backward_bytes: int, head_bytes: int) -> list[int]:
    """Activation peak of each stage under DeepSpeed's 1F1B schedule, from one micro batch's
    estimate over the whole model (:func:`model.memory.estimate_activation_memory`):
    ``blocks_bytes`` kept by all blocks, ``block_backward_bytes`` a block backward's working set,
    ``head_bytes`` the final norm and loss at their peak. Stage s runs ``min(stages - s,
    grad_accum_steps)`` micro batches forward before their first backward, so it keeps that many
    micro batches' activations of its own blocks; the last stage adds the head."""
    parts = stage_parts(cfg, stages)
    out = []
    for s in range(stages):
        blocks = sum(1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= cfg.n_layers)
        kept = min(stages - s, grad_accum_steps) * blocks * blocks_bytes // cfg.n_layers
        out.append(kept + (max(head_bytes, block_backward_bytes) if s == stages - 1 else block_backward_bytes))
    return out


def model_parameters(pipe: nn.Module, cfg: ModelConfig) -> dict[str, nn.Parameter]:
    """This stage's parameters of ``pipe`` by their Transformer names (:func:`model_name`)."""
    return {model_name(name, cfg): param for name, param in pipe.named_parameters()}
