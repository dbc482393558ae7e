"""Regional compilation: ``torch.compile`` applied to each Transformer block on its own.

As torchtitan does, every :class:`~model.transformer.Block` is compiled separately and the rest
of the model (embedding, final norm, output head and loss) stays eager. All blocks share one
code object, so Dynamo traces a block once and the other blocks reuse the compiled graph (one
compilation instead of ``n_layers``); the start-up cost does not grow with depth, and the eager
parts between blocks leave room for DeepSpeed's hooks (ZeRO-3 gathers a block's parameters in
hooks that DeepSpeed excludes from compilation, so they run as graph breaks around the compiled
code).

Blocks are compiled in place with :meth:`torch.nn.Module.compile`, so parameter names, state
dicts, checkpoints and model directories are the same as without compilation; activation
checkpointing wraps the compiled block (:meth:`Transformer.hidden_states` calls ``checkpoint``
on the block module, whose call is the compiled one).

The model holds no distributed code: this only marks modules for compilation (which happens
lazily at their first call); the training code decides when to call it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from crucible.errors import ConfigError
from model.transformer import Block

log = logging.getLogger("crucible.model.compile")


def compile_blocks(model: nn.Module, dynamic: bool | None = False) -> int:
    """Mark every :class:`Block` in ``model`` for ``torch.compile`` (in place); returns how many.

    ``dynamic=False``: shapes are specialised, as suits pretraining's fixed batch shape; a batch of
    another shape (an evaluation batch of another size) compiles once more for that shape.
    ``dynamic=None``: torch's default, a second shape recompiles with dynamic sizes (for padded
    fine-tuning batches whose length varies).
    """
    if not hasattr(nn.Module, "compile"):
        raise ConfigError(f"train.compile=true needs torch >= 2.2 (nn.Module.compile); this is torch "
                          f"{torch.__version__}: upgrade torch or set train.compile=false")
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile(dynamic=dynamic)
    log.info("torch.compile on: %d Transformer blocks compiled one by one (inductor, %s shapes; embedding, "
             "output head and loss eager); the first step waits for the compilation", len(blocks),
             "static" if dynamic is False else "automatic dynamic")
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_blocks` marked ``module`` (a :class:`Block`) for compilation."""
    return getattr(module, "_compiled_call_impl", None) is not None
