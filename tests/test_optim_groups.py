"""Weight decay as the README documents it, on the real models: the Transformer (tied and untied
output head) and a fine-tuning head with a bias: weight matrices decayed; embeddings, norm gains
and biases not (unless optim.decay_norms_and_embeddings); every parameter in exactly one group."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, resolve_model_config
from model.heads import build_head
from model.transformer import Transformer
from training.config import OptimConfig
from training.optim import param_groups


def _transformer(tie: bool) -> Transformer:
    cfg = resolve_model_config(ModelConfig(preset="tiny", tie_embeddings=tie), vocab_size=64)
    return Transformer(cfg)


def _names(model: torch.nn.Module, group: dict) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


def _check_partition(model: torch.nn.Module, groups: list[dict]) -> None:
    """Every (deduplicated) trainable parameter in exactly one group, listed once."""
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("tie", [False, True])
def test_transformer_groups_decay_matrices_only(tie):
    model = _transformer(tie)
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    _check_partition(model, groups)
    decayed, undecayed = _names(model, groups[0]), _names(model, groups[1])
    norms = {"norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(model.cfg.n_layers)
                               for n in ("attn_norm", "mlp_norm")}
    assert undecayed == {"embed.weight"} | norms
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2} - {"embed.weight"}
    assert decayed == matrices
    if tie:
        # one parameter shared by the embedding and the output head, in the undecayed group only
        assert model.lm_head.weight is model.embed.weight
        assert "lm_head.weight" not in dict(model.named_parameters())
        assert any(p is model.lm_head.weight for p in groups[1]["params"])
        assert not any(p is model.lm_head.weight for p in groups[0]["params"])
    else:
        assert "lm_head.weight" in decayed


def test_decay_norms_and_embeddings_decays_everything():
    model = _transformer(tie=True)
    groups = param_groups(model, OptimConfig(weight_decay=0.1, decay_norms_and_embeddings=True))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    _check_partition(model, groups)


def test_task_head_bias_and_backbone_embedding_are_not_decayed():
    model = build_head("token_classification", _transformer(tie=True), num_labels=5, pad_id=3)
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    _check_partition(model, groups)
    decayed, undecayed = _names(model, groups[0]), _names(model, groups[1])
    assert "score.weight" in decayed and "model.layers.0.attn.wq.weight" in decayed
    assert {"score.bias", "model.embed.weight", "model.norm.weight"} <= undecayed
    assert all(p.ndim < 2 or n == "model.embed.weight" for n, p in model.named_parameters()
               if n in undecayed)
