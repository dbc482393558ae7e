"""Pretraining from existing weights (``init_from``): continued pretraining of a released model
or of another run.

The source is resolved like fine-tuning's (:func:`training.tasks.features.find_init_model`: a
model directory, a Hugging Face Llama directory, or a run or checkpoint directory's newest whole
model). Its architecture becomes the run's model config (:func:`init_model_config`; keys the
recipe sets must agree, :func:`architecture_mismatches`), the token shards must come from its
tokenizer (:func:`check_tokenizer`), and its weights are copied into the freshly built model
one tensor at a time (:func:`load_init_weights`): under ZeRO-3 rank 0 reads each tensor and
DeepSpeed scatters it into the partitions, so no process ever holds the whole model. Only the
weights travel: optimizer state, learning-rate schedule and data position start fresh. The
source is recorded in ``<run_dir>/init_from.json`` (:func:`source_record`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.errors import ConfigError, DataError
from crucible.fileio import atomic_write_json, sha256_file
from crucible.run_layout import MARKER, MODEL_DIR, read_record
from model.config import PRESETS, ModelConfig, max_seq_len_is_explicit, resolve_model_config
from model.hf_mapping import from_hf_key
from model.io import hf_weight_files, is_model_dir, read_hf_config, read_model_config, weight_files

log = logging.getLogger("crucible.training.init_model")

INIT_RECORD = "init_from.json"
"""The record of the start weights in the run directory."""

# The recipe's model keys that define the weights' shapes or meaning: with init_from each one the
# recipe (or its preset) sets must be the source's. Keys compared through a derived value (the
# key's effect) name the key the user wrote. The rotary embedding's base and scaling are not among
# them: changing them is how a context is extended (the recipe's value is taken, with a warning).
_ARCHITECTURE = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "kv_heads",
    "ffn_dim": "hidden_dim", "ffn_multiple_of": "hidden_dim", "norm_eps": "norm_eps",
    "tie_embeddings": "tie_embeddings",
}
# Not taken from the recipe: the preset only names a shape, the vocabulary is the source's.
_SOURCE_KEYS = ("preset", "vocab_size")


@dataclass(frozen=True)
class InitSource:
    """The model ``init_from`` names."""

    given: str
    """``init_from`` as written."""
    model_dir: Path
    """The model directory or Hugging Face directory it resolved to."""
    cfg: ModelConfig
    """The source's architecture."""
    hugging_face: bool
    """A Hugging Face Llama directory (else this project's model directory)."""
    step: int | None
    """The training step of the checkpoint the model directory belongs to, when it is one."""

    @property
    def kind(self) -> str:
        return "Hugging Face Llama directory" if self.hugging_face else "model directory"


def find_init_source(init_from: str) -> InitSource:
    """Resolve ``init_from`` and read its config (no weights yet)."""
    from training.tasks.features import find_init_model

    model_dir = find_init_model(init_from)
    hugging_face = not is_model_dir(model_dir)
    cfg = read_hf_config(model_dir) if hugging_face else read_model_config(model_dir)
    marker = read_record(model_dir.parent / MARKER)[0] if model_dir.name == MODEL_DIR else None
    step = marker.get("step") if marker is not None else None
    return InitSource(init_from, model_dir, cfg, hugging_face, step if isinstance(step, int) else None)


def architecture_mismatches(recipe: ModelConfig, source: ModelConfig) -> list[str]:
    """``model.<key>: recipe <value>, init_from <value>`` for every architecture key the recipe
    sets (itself or through its preset) that differs from the source."""
    given = set(recipe.model_fields_set) | set(PRESETS.get(recipe.preset or "", {}))
    resolved = resolve_model_config(recipe)
    out: list[str] = []
    compared: set[str] = set()
    for key, effect in _ARCHITECTURE.items():
        if key not in given or effect in compared:
            continue
        compared.add(effect)
        ours, theirs = getattr(resolved, effect), getattr(source, effect)
        if ours != theirs:
            name = "ffn_dim" if effect == "hidden_dim" else key
            out.append(f"model.{name}: recipe {ours}, init_from {theirs}")
    return out


def init_model_config(recipe: ModelConfig, source: InitSource, seq_len: int) -> ModelConfig:
    """The run's model config: the source's architecture and vocabulary with the other keys the
    recipe sets (activation checkpointing, dtype, an explicit ``max_seq_len``, ...). The context
    grows to the shards' ``seq_len`` when it is longer and not set explicitly; a ConfigError
    names every architecture key that differs from the source."""
    mismatches = architecture_mismatches(recipe, source.cfg)
    if mismatches:
        raise ConfigError(
            f"init_from={source.given} ({source.kind} {source.model_dir}) has another architecture "
            f"than the recipe's model section: {'; '.join(mismatches)}. With init_from the "
            "architecture is the source's: remove these keys (and model.preset) from the model "
            "section, or start from a model of this shape")
    update = {k: getattr(recipe, k) for k in recipe.model_fields_set
              if k not in _ARCHITECTURE and k not in _SOURCE_KEYS}
    if update.get("rope_theta", source.cfg.rope_theta) != source.cfg.rope_theta:
        log.warning("model.rope_theta %g replaces the %g of init_from=%s: every position is encoded "
                    "anew (as for context extension)", update["rope_theta"], source.cfg.rope_theta, source.given)
    if not max_seq_len_is_explicit(recipe) and seq_len > source.cfg.max_seq_len:
        log.warning("the token shards hold sequences of %d tokens, longer than the max_seq_len %d of "
                    "init_from=%s: the context grows to %d (positions the source never trained on)",
                    seq_len, source.cfg.max_seq_len, source.given, seq_len)
        update["max_seq_len"] = seq_len
    cfg = ModelConfig.model_validate({**source.cfg.model_dump(), **update})
    if cfg.max_seq_len < seq_len:
        raise ConfigError(
            f"the token shards hold sequences of {seq_len} tokens but model.max_seq_len is set to "
            f"{cfg.max_seq_len}; set model.max_seq_len={seq_len} (or leave it out)")
    return cfg


def check_tokenizer(source: InitSource, shards_sha256: str | None, shards_vocab: int, manifest: str) -> None:
    """The token shards must be the source's tokenizer's: the same ``tokenizer.model`` (sha256)
    when the source has one, else (a Hugging Face directory with only ``tokenizer.json``) the
    same vocabulary size. A DataError names both and how to rebuild the shards."""
    fix = ("rebuild the token shards with the model's tokenizer (python launcher/shard.py --config "
           f"configs/data/<data recipe>.yaml input=<clean dir> tokenizer_dir={source.model_dir} "
           "output=<dir>), or start from a model trained with the shards' tokenizer")
    model_file = source.model_dir / "tokenizer.model"
    if model_file.is_file():
        theirs = sha256_file(model_file)
        if shards_sha256 is not None and shards_sha256 != theirs:
            raise DataError(
                f"the token shards of {manifest} were written with another tokenizer (sha256 "
                f"{shards_sha256[:12]}...) than init_from's {model_file} (sha256 {theirs[:12]}...): "
                f"the model would read other words than it learnt; {fix}")
        if shards_vocab > source.cfg.vocab_size:
            raise DataError(f"the token shards of {manifest} have a vocabulary of {shards_vocab} but "
                            f"init_from's model {source.model_dir} only {source.cfg.vocab_size}; {fix}")
        return
    if shards_vocab != source.cfg.vocab_size:
        raise DataError(
            f"the token shards of {manifest} have a vocabulary of {shards_vocab} tokens but "
            f"init_from's model {source.model_dir} has {source.cfg.vocab_size} (and no tokenizer.model "
            f"to compare exactly); {fix}")


@contextmanager
def source_tensors(source: InitSource) -> Iterator[dict[str, tuple[Any, str]]]:
    """``{our tensor name: (open safetensors file, its key there)}`` over the source's weight
    files, kept open meanwhile: a tensor is read only when asked for (``get_tensor``)."""
    from safetensors import safe_open

    with ExitStack() as stack:
        where: dict[str, tuple[Any, str]] = {}
        for file in source_weight_files(source):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for key in handle.keys():  # noqa: SIM118 - a safetensors file, not a dict
                ours = from_hf_key(key) if source.hugging_face else key
                if ours is not None:
                    where[ours] = (handle, key)
        yield where


def load_init_weights(model: torch.nn.Module, source: InitSource, partitioned: bool, rank: int,
                      params: dict[str, torch.nn.Parameter] | None = None) -> None:
    """Copy the source's weights into ``model`` (built for the source's config), in fp32 on the
    model's device, one tensor at a time. ``partitioned`` (ZeRO-3, built inside
    ``deepspeed.zero.Init``): each parameter is gathered, rank 0 reads and writes it, and
    DeepSpeed scatters rank 0's values back into every rank's partition, so a rank holds at most
    one whole tensor beyond its partitions and the other ranks read nothing. ``params``: the
    parameters to fill by their Transformer names (a pipeline stage's), instead of ``model``'s own."""
    start = time.perf_counter()
    if params is None:
        params = dict(model.named_parameters())  # a tied output head is the embedding, listed once
    with source_tensors(source) as where:
        _check_tensors(source, where, params)  # every rank, before any collective
        for name, param in params.items():
            with _gathered(param) if partitioned else nullcontext():
                if partitioned and rank != 0:
                    continue
                handle, key = where[name]
                with torch.no_grad():
                    param.copy_(handle.get_tensor(key))
    log.info("loaded the weights of init_from=%s (%s %s%s) in %.2f s", source.given, source.kind,
             source.model_dir, f", step {source.step}" if source.step is not None else "",
             time.perf_counter() - start)


def _check_tensors(source: InitSource, where: dict[str, tuple[Any, str]],
                   params: dict[str, torch.nn.Parameter]) -> None:
    """Every parameter has a tensor of its shape in the source (read from the files' headers);
    else a DataError naming the first ones."""
    missing = sorted(set(params) - set(where))
    if missing:
        raise DataError(f"init_from={source.given}: {source.model_dir} lacks {len(missing)} tensors "
                        f"of the model ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    for name, param in params.items():
        handle, key = where[name]
        shape = tuple(handle.get_slice(key).get_shape())
        wanted = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the whole tensor's
        if shape != wanted:
            raise DataError(f"init_from={source.given}: tensor {key} of {source.model_dir} has shape "
                            f"{shape}, the model needs {wanted}")


def _gathered(param: torch.nn.Parameter) -> Any:
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def source_weight_files(source: InitSource) -> list[Path]:
    return hf_weight_files(source.model_dir) if source.hugging_face else weight_files(source.model_dir)


def weight_file_hashes(source: InitSource, rank: int, world_size: int) -> dict[str, str]:
    """sha256 of this rank's share of the source's weight files (every ``world_size``-th from
    ``rank``): the ranks hash a large sharded model together, each file read once."""
    return {f.name: sha256_file(f) for f in source_weight_files(source)[rank::world_size]}


def source_record(source: InitSource, weights_sha256: dict[str, str]) -> dict[str, Any]:
    """What ``init_from.json`` holds: the source as given and resolved, its kind, the step of
    its checkpoint (when it is one), its architecture and the sha256 of each weight file."""
    return {"init_from": source.given, "model_dir": str(source.model_dir), "kind": source.kind,
            "step": source.step, "model_config": source.cfg.model_dump(mode="json"),
            "weights_sha256": dict(sorted(weights_sha256.items()))}


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(run_dir / INIT_RECORD, record, indent=2, sort_keys=True)


def read_record_of_run(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``init_from.json`` (None when it started from random weights)."""
    path = run_dir / INIT_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("cannot read %s; the checkpoints of this session will not name the start weights", path)
        return None
