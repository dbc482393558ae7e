"""Task heads on the pretrained Transformer backbone.

Each head holds the backbone as ``model`` and mirrors the matching Hugging Face class, so
export is a renaming of parameters:

- :class:`SequenceClassifier` ~ ``LlamaForSequenceClassification``: ``score`` (no bias) over
  the hidden state of the last non-pad token of each row;
- :class:`TokenClassifier` ~ ``LlamaForTokenClassification``: ``score`` (with bias) per token;
- :class:`QuestionAnswering` ~ ``LlamaForQuestionAnswering``: ``qa_outputs`` (with bias) giving
  start and end logits per token.

Rows are right-padded with ``pad_id``; attention is causal, so real tokens never see padding.
The backbone's ``lm_head`` is not used by the heads (it stays for a tied embedding).

Each head class carries what differs per kind (its task ``kind``, its Hugging Face class, where
that class keeps the backbone, the config fields it adds); :data:`HEADS` maps a kind to its
class and is the only place that lists the kinds.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from model.transformer import Transformer


def last_non_pad_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index of the rightmost non-pad token per row (B,), as Hugging Face pools."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return ((tokens != pad_id).long() * positions).argmax(-1)


class TaskHead(nn.Module):
    """A head over the backbone ``model``; subclasses set the class attributes below."""

    kind: ClassVar[str]
    """The task kind (``task.kind`` of a fine-tune config, ``kind`` of ``task.json``)."""
    hf_class: ClassVar[str]
    """The matching Hugging Face class (``architectures`` of the exported ``config.json``)."""
    hf_backbone_prefix: ClassVar[str] = "model."
    """Where that Hugging Face class keeps the Llama backbone's tensors."""

    def __init__(self, backbone: Transformer, pad_id: int) -> None:
        super().__init__()
        self.model = backbone
        self.pad_id = pad_id

    @property
    def cfg(self):
        return self.model.cfg

    @classmethod
    def build(cls, backbone: Transformer, num_labels: int, pad_id: int,
              problem_type: str = "single_label") -> TaskHead:
        """The head for a task of this kind (each kind takes what it needs of the arguments)."""
        raise NotImplementedError

    @classmethod
    def hf_config_fields(cls, labels: list[str], problem_type: str) -> dict[str, Any]:
        """What this head adds to the exported Hugging Face ``config.json``."""
        return {}

    def _init_linear(self, layer: nn.Linear) -> None:
        with torch.no_grad():
            nn.init.normal_(layer.weight, std=self.model.cfg.init_std)
            if layer.bias is not None:
                layer.bias.zero_()


class LabelledHead(TaskHead):
    """A head with one output per label; the export names the labels."""

    @classmethod
    def hf_config_fields(cls, labels: list[str], problem_type: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"num_labels": len(labels) or 1}
        if labels:
            fields["id2label"] = {str(i): name for i, name in enumerate(labels)}
            fields["label2id"] = {name: i for i, name in enumerate(labels)}
        return fields


class SequenceClassifier(LabelledHead):
    kind = "classification"
    hf_class = "LlamaForSequenceClassification"
    # our problem_type -> Hugging Face's
    HF_PROBLEM_TYPES: ClassVar[dict[str, str]] = {
        "single_label": "single_label_classification",
        "multi_label": "multi_label_classification",
        "regression": "regression",
    }

    def __init__(self, backbone: Transformer, num_labels: int, pad_id: int,
                 problem_type: Literal["single_label", "multi_label", "regression"] = "single_label") -> None:
        super().__init__(backbone, pad_id)
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.score = nn.Linear(backbone.cfg.dim, num_labels, bias=False)
        self._init_linear(self.score)

    @classmethod
    def build(cls, backbone: Transformer, num_labels: int, pad_id: int,
              problem_type: str = "single_label") -> SequenceClassifier:
        return cls(backbone, num_labels, pad_id, problem_type)  # type: ignore[arg-type]

    @classmethod
    def hf_config_fields(cls, labels: list[str], problem_type: str) -> dict[str, Any]:
        return {**super().hf_config_fields(labels, problem_type),
                "problem_type": cls.HF_PROBLEM_TYPES[problem_type]}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(tokens)  # (B, T, C)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.score(hidden[rows, last_non_pad_index(tokens, self.pad_id)])  # (B, L)


class TokenClassifier(LabelledHead):
    kind = "token_classification"
    hf_class = "LlamaForTokenClassification"

    def __init__(self, backbone: Transformer, num_labels: int, pad_id: int, dropout: float = 0.0) -> None:
        super().__init__(backbone, pad_id)
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(backbone.cfg.dim, num_labels, bias=True)
        self._init_linear(self.score)

    @classmethod
    def build(cls, backbone: Transformer, num_labels: int, pad_id: int,
              problem_type: str = "single_label") -> TokenClassifier:
        return cls(backbone, num_labels, pad_id)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.score(self.dropout(self.model.hidden_states(tokens)))  # (B, T, L)


class QuestionAnswering(TaskHead):
    kind = "qa"
    hf_class = "LlamaForQuestionAnswering"
    hf_backbone_prefix = "transformer."

    def __init__(self, backbone: Transformer, pad_id: int) -> None:
        super().__init__(backbone, pad_id)
        self.qa_outputs = nn.Linear(backbone.cfg.dim, 2, bias=True)
        self._init_linear(self.qa_outputs)

    @classmethod
    def build(cls, backbone: Transformer, num_labels: int, pad_id: int,
              problem_type: str = "single_label") -> QuestionAnswering:
        return cls(backbone, pad_id)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.qa_outputs(self.model.hidden_states(tokens))  # (B, T, 2): start, end


# The registry of head kinds.
HEADS: dict[str, type[TaskHead]] = {
    head.kind: head for head in (SequenceClassifier, TokenClassifier, QuestionAnswering)
}
HEAD_KINDS = tuple(HEADS)


def head_class(kind: str) -> type[TaskHead]:
    """The head class of a task kind."""
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")
    return HEADS[kind]


def build_head(kind: str, backbone: Transformer, num_labels: int, pad_id: int,
               problem_type: str = "single_label") -> TaskHead:
    return head_class(kind).build(backbone, num_labels, pad_id, problem_type)


def head_parameters(head: nn.Module) -> list[nn.Parameter]:
    """The new (non-backbone) parameters: trained alone while the backbone is frozen."""
    return [p for name, p in head.named_parameters() if not name.startswith("model.")]
