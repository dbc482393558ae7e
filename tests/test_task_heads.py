"""Task heads: shapes and losses, task model directories, Hugging Face export parity."""

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.heads import HEAD_KINDS, HEADS, build_head, last_non_pad_index
from model.task_io import export_task_hf, load_task_dir, save_task_dir
from model.transformer import Transformer
from tests.datasets import shared_token_dataset
from training.tasks.config import TaskConfig
from training.tasks.registry import TASK_KINDS

PAD, EOS = 3, 2


def head_loss(kind: str, logits: torch.Tensor, target: torch.Tensor, problem_type: str):
    """The registered task kind's summed loss and label count, as the fine-tune step uses them."""
    task = TASK_KINDS[kind](TaskConfig(kind=kind, format="jsonl", problem_type=problem_type))
    return task.loss(logits, target), task.label_count(target)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return shared_token_dataset(tmp_path_factory).parent.parent / "tokenizer"


def _cfg(**kw) -> ModelConfig:
    base = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "max_seq_len": 64}
    return ModelConfig(**{**base, **kw})


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 512, (3, 12), generator=g)
    tokens[0, 9:] = PAD   # right padding of unequal lengths
    tokens[1, 5:] = PAD
    return tokens


def _head(kind: str, n: int = 5, **kw):
    torch.manual_seed(0)
    return build_head(kind, Transformer(_cfg(**kw)), n, PAD).eval()


def test_last_non_pad_index():
    assert last_non_pad_index(_batch(), PAD).tolist() == [8, 4, 11]


def test_head_shapes_and_losses():
    tokens = _batch()
    cls = _head("classification", 3)
    logits = cls(tokens)
    assert logits.shape == (3, 3)
    loss_sum, count = head_loss("classification", logits, torch.tensor([[0.], [2.], [1.]]), "single_label")
    assert count == 3 and torch.isclose(loss_sum / count, F.cross_entropy(logits, torch.tensor([0, 2, 1])))

    multi = build_head("classification", cls.model, 4, PAD, "multi_label")
    target = torch.tensor([[1., 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    loss_sum, count = head_loss("classification", multi(tokens), target, "multi_label")
    assert count == 12 and torch.isclose(
        loss_sum / count, F.binary_cross_entropy_with_logits(multi(tokens), target))

    tok = _head("token_classification", 5)
    logits = tok(tokens)
    assert logits.shape == (3, 12, 5)
    target = torch.full((3, 12), -100)
    target[0, :3] = torch.tensor([1, 0, 4])
    target[2, 7] = 2
    loss_sum, count = head_loss("token_classification", logits, target, "single_label")
    assert count == 4  # padding and non-first sub-words are not counted
    assert torch.isclose(loss_sum / count, F.cross_entropy(logits.flatten(0, 1), target.flatten()))

    qa = _head("qa")
    logits = qa(tokens)
    assert logits.shape == (3, 12, 2)
    loss_sum, count = head_loss("qa", logits, torch.tensor([[2, 3], [0, 0], [5, 9]]), "single_label")
    assert count == 3


def test_causal_padding_does_not_change_real_tokens():
    head = _head("classification", 2)
    tokens = _batch()
    short = tokens[1:2, :5]
    assert torch.allclose(head(tokens)[1], head(short)[0], atol=1e-6)


def test_each_head_kind_is_built_by_its_registered_class():
    assert HEAD_KINDS == ("classification", "token_classification", "qa")
    backbone = Transformer(_cfg())
    for kind in HEAD_KINDS:
        head = build_head(kind, backbone, 3, PAD)
        assert type(head) is HEADS[kind] and head.kind == kind
    with pytest.raises(ValueError, match="unknown head kind 'ner'.*classification"):
        build_head("ner", backbone, 3, PAD)


HF = {"classification": "LlamaForSequenceClassification",
      "token_classification": "LlamaForTokenClassification",
      "qa": "LlamaForQuestionAnswering"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classification", "token_classification", "qa"])
@pytest.mark.parametrize("tied", [False, True])
def test_task_dir_round_trip_and_hf_export_parity(kind, tied, tok_dir, tmp_path):
    import transformers

    head = _head(kind, 3, tie_embeddings=tied, rope_theta=50000.0)
    labels = ["O", "B-x", "I-x"] if kind == "token_classification" else (["neg", "pos", "mid"] if kind == "classification" else [])
    task = {"kind": kind, "labels": labels, "problem_type": "single_label", "pad_id": PAD,
            "eos_id": EOS, "bos_id": 1, "max_length": 64}
    save_task_dir(tmp_path / "task", head.state_dict(), head.cfg, task, tokenizer_dir=tok_dir)
    loaded, task_back = load_task_dir(tmp_path / "task")
    tokens = _batch()
    ours = head(tokens)
    assert task_back == task
    assert torch.equal(loaded.eval()(tokens), ours)

    export_task_hf(tmp_path / "task", tmp_path / "hf")
    hf = getattr(transformers, HF[kind]).from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=(tokens != PAD).long())
    if kind == "classification":
        theirs = out.logits
        assert hf.config.id2label == {0: "neg", 1: "pos", 2: "mid"}
        diff = (theirs - ours).abs().max()
    elif kind == "token_classification":
        real = tokens != PAD
        diff = (out.logits[real] - ours[real]).abs().max()
    else:
        real = tokens != PAD
        diff = max((out.start_logits[real] - ours[..., 0][real]).abs().max(),
                   (out.end_logits[real] - ours[..., 1][real]).abs().max())
    assert diff <= 1e-5, f"max abs logits difference {diff}"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.pad_token_id == PAD
