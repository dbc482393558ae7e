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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from model.transformer import Transformer

HEAD_KINDS = ("classification", "token_classification", "qa")


def last_non_pad_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index of the rightmost non-pad token per row (B,), as Hugging Face pools."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return ((tokens != pad_id).long() * positions).argmax(-1)


class _Head(nn.Module):
    def __init__(self, backbone: Transformer, pad_id: int) -> None:
        super().__init__()
        self.model = backbone
        self.pad_id = pad_id

    @property
    def cfg(self):
        return self.model.cfg

    def _init_linear(self, layer: nn.Linear) -> None:
        with torch.no_grad():
            nn.init.normal_(layer.weight, std=self.model.cfg.init_std)
            if layer.bias is not None:
                layer.bias.zero_()


class SequenceClassifier(_Head):
    kind = "classification"

    def __init__(self, backbone: Transformer, num_labels: int, pad_id: int,
                 problem_type: Literal["single_label", "multi_label", "regression"] = "single_label") -> None:
        super().__init__(backbone, pad_id)
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.score = nn.Linear(backbone.cfg.dim, num_labels, bias=False)
        self._init_linear(self.score)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(tokens)  # (B, T, C)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.score(hidden[rows, last_non_pad_index(tokens, self.pad_id)])  # (B, L)


class TokenClassifier(_Head):
    kind = "token_classification"

    def __init__(self, backbone: Transformer, num_labels: int, pad_id: int, dropout: float = 0.0) -> None:
        super().__init__(backbone, pad_id)
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(backbone.cfg.dim, num_labels, bias=True)
        self._init_linear(self.score)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.score(self.dropout(self.model.hidden_states(tokens)))  # (B, T, L)


class QuestionAnswering(_Head):
    kind = "qa"

    def __init__(self, backbone: Transformer, pad_id: int) -> None:
        super().__init__(backbone, pad_id)
        self.qa_outputs = nn.Linear(backbone.cfg.dim, 2, bias=True)
        self._init_linear(self.qa_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.qa_outputs(self.model.hidden_states(tokens))  # (B, T, 2): start, end


def build_head(kind: str, backbone: Transformer, num_labels: int, pad_id: int,
               problem_type: str = "single_label") -> _Head:
    if kind == "classification":
        return SequenceClassifier(backbone, num_labels, pad_id, problem_type)  # type: ignore[arg-type]
    if kind == "token_classification":
        return TokenClassifier(backbone, num_labels, pad_id)
    if kind == "qa":
        return QuestionAnswering(backbone, pad_id)
    raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")


def head_parameters(head: nn.Module) -> list[nn.Parameter]:
    """The new (non-backbone) parameters: trained alone while the backbone is frozen."""
    return [p for name, p in head.named_parameters() if not name.startswith("model.")]
