"""Document attention (``model.attention: document``): a packed sample scores each of its
documents as if it were alone; single-document inputs score as the causal model (and so as the
exported Hugging Face model)."""

import pytest
import torch

from crucible.errors import ConfigError
from model.attention import (
    build_document_mask,
    dense_document_mask,
    document_ids,
    document_positions,
)
from model.config import ModelConfig, resolve_model_config
from model.transformer import build_transformer

VOCAB, EOS = 96, 2

# fp32 throughout. A document alone and the same document inside a packed row go through the
# same projections token by token; only the attention reductions differ (the packed row's other
# documents enter as exact zeros after the softmax, but the kernel's blocking, and so the order
# of the fp32 sums, changes with the row's length): differences of a few ulps of O(1) logits.
TOL = {"atol": 1e-5, "rtol": 1e-5}


def config(**kw) -> ModelConfig:
    # GQA (4 query heads, 2 kv heads) so the masked grouped-query path is the one under test; a
    # larger init than training's so logits differ clearly between tokens and positions.
    shape = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "init_std": 0.1}
    return resolve_model_config(ModelConfig(**{**shape, **kw}), vocab_size=VOCAB)


def make_document(length: int, seed: int) -> torch.Tensor:
    """``length`` tokens, the last one EOS and no other."""
    body = torch.randint(EOS + 1, VOCAB, (length - 1,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([body, torch.tensor([EOS])])


def test_document_ids_and_positions_restart_after_each_eos():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9],
                           [EOS, 5, 5, 5, 5, 5, EOS]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]]
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 3, 4, 5]]
    mask = dense_document_mask(ids)  # (B, 1, T, T)
    assert mask.shape == (2, 1, 7, 7)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False]  # 2nd document
    assert mask[1, 0, 6].tolist() == [False, True, True, True, True, True, True]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["dense", "flex"])
def test_packed_sample_logits_equal_each_document_run_alone(kernel):
    """Three documents packed in a row (and the same three in another order in a second row):
    the logits at each document's tokens are those of the document run alone, positions from 0.
    ``dense`` is the CPU path the model takes by itself; ``flex`` is the CUDA path (FlexAttention
    with a block mask, here its eager CPU implementation) given the same mask predicate."""
    model = build_transformer(config(attention="document", eos_id=EOS), seed=0).eval()
    docs = [make_document(n, seed) for seed, n in enumerate((9, 20, 13))]
    rows = torch.stack([torch.cat(docs), torch.cat([docs[2], docs[0], docs[1]])])  # (2, 42)
    with torch.no_grad():
        if kernel == "dense":
            packed = model(rows)  # the model derives ids, mask and positions from the EOS tokens
        else:
            ids = document_ids(rows, EOS)
            packed = model(rows, positions=document_positions(ids), mask=build_document_mask(ids, "flex"))
        alone = [model(doc[None])[0] for doc in docs]  # (n, V) each
    for row, order in enumerate(([0, 1, 2], [2, 0, 1])):
        start = 0
        for d in order:
            n = len(docs[d])
            torch.testing.assert_close(packed[row, start:start + n], alone[d], **TOL)
            start += n
    causal = build_transformer(config(), seed=0).eval()
    with torch.no_grad():  # the test can fail: causal attention sees the earlier documents
        assert (causal(rows)[0, 9:] - packed[0, 9:]).abs().max() > 1e-2


def test_document_scores_do_not_depend_on_where_its_positions_start():
    """Why ``model.attention: document`` needs no choice of positions: rotary attention depends
    only on query-key distances, so positions continued over the sample (7..17 for a document
    after a 7-token one) give the restarted positions' logits."""
    model = build_transformer(config(attention="document", eos_id=EOS), seed=0).eval()
    first, second = make_document(7, 1), make_document(11, 2)
    rows = torch.cat([first, second])[None]  # (1, 18)
    ids = document_ids(rows, EOS)
    with torch.no_grad():
        restarted = model(rows)[0]
        continued = model(rows, positions=torch.arange(18)[None], mask=build_document_mask(ids))[0]
        unmasked = model(rows, positions=torch.arange(18)[None],
                         mask=build_document_mask(torch.zeros_like(ids)))[0]
    torch.testing.assert_close(continued, restarted, **TOL)
    assert (unmasked[7:] - restarted[7:]).abs().max() > 1e-2  # the mask, not the positions, matters


def test_single_document_scores_as_the_causal_model_with_gradients():
    """With one document (EOS only at the end, or none), document attention is causal attention:
    same loss and same gradients, also with activation checkpointing (the mask is recomputed
    with the block)."""
    tokens = torch.cat([make_document(30, 3), torch.tensor([7])])[None]  # (1, 31): a cut-off 2nd doc
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    grads = []
    for kw in ({}, {"attention": "document", "eos_id": EOS, "activation_checkpointing": True}):
        model = build_transformer(config(**kw), seed=0).train()
        loss = model(inputs, targets=targets)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    for document, causal in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(document, causal, **TOL)


def test_hf_export_of_a_document_model_is_exact_for_single_documents(tmp_path):
    """The exported LlamaForCausalLM is causal: it equals the document model on one document."""
    from transformers import AutoModelForCausalLM

    from model.convert import export_hf
    from model.io import save_model_dir

    cfg = config(attention="document", eos_id=EOS)
    ours = build_transformer(cfg, seed=1).eval()
    save_model_dir(tmp_path / "m", ours.state_dict(), cfg)
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    single = torch.stack([make_document(40, 4), make_document(40, 5)])  # EOS last: one document each
    with torch.no_grad():
        torch.testing.assert_close(hf(single).logits, ours(single), **TOL)


def test_document_attention_needs_the_eos_id():
    with pytest.raises(ConfigError, match="model.eos_id"):
        build_transformer(config(attention="document"))
    with pytest.raises(ValueError, match="model.eos_id must be a token id"):
        config(attention="document", eos_id=VOCAB)


def test_pretraining_takes_the_shards_eos_id_and_refuses_another():
    from crucible.errors import UserError
    from training.config import PretrainConfig
    from training.steps.language_model import model_config_for

    recipe = PretrainConfig.model_validate({"model": {"preset": "tiny", "attention": "document"}})
    assert model_config_for(recipe, 512, 64, eos_id=EOS).eos_id == EOS
    assert model_config_for(recipe.model_copy(update={"model": ModelConfig(preset="tiny")}),
                            512, 64, eos_id=EOS).eos_id is None  # causal: nothing to fill
    other = PretrainConfig.model_validate({"model": {"preset": "tiny", "attention": "document", "eos_id": 5}})
    with pytest.raises(UserError, match="model.eos_id is 5"):
        model_config_for(other, 512, 64, eos_id=EOS)
