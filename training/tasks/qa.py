"""Extractive QA: windows over long contexts, answer positions, n-best span decoding, SQuAD metrics.

Schema: ``id``, ``context``, ``question``, ``answers`` {``text``: [...], ``answer_start``: [...]}.
Input layout per window: ``question EOS context_window EOS``. A long context gives several
windows that overlap by ``doc_stride`` tokens. A window that does not contain the whole gold
answer is trained to point at position 0 (the "no answer here" convention of Hugging Face QA
heads). Decoding takes, over all windows of an example, the best valid span by start + end
logit and returns its exact characters from the context through the offsets.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from crucible.errors import DataError
from training.tasks.base import TaskKind


def answer_token_span(context: str, offsets: list[tuple[int, int]], start_char: int,
                      end_char: int) -> tuple[int, int, bool] | None:
    """First and last token covering [start_char, end_char), and whether the span's
    characters are exactly the answer once glued edge punctuation is trimmed (False when an
    answer edge falls inside a word)."""
    start_tok = end_tok = None
    for i, (s, e) in enumerate(offsets):
        if start_tok is None and s <= start_char < e:
            start_tok = i
        if s < end_char <= e:
            end_tok = i
            break
    if start_tok is None or end_tok is None or end_tok < start_tok:
        return None
    span = (offsets[start_tok][0], offsets[end_tok][1])
    exact = span == (start_char, end_char) or trim_span(context, *span) == (start_char, end_char)
    return start_tok, end_tok, exact


EDGE_OPEN = "\"'([{“‘«"
EDGE_CLOSE = "\"')]}”’».,;:!?"


def trim_span(context: str, start: int, end: int) -> tuple[int, int]:
    """Drop whitespace and edge punctuation that a token glued onto the span (``Newton,``).

    sentencepiece merges punctuation into neighbouring pieces, so a token span can carry a
    comma or quote that is not part of the answer; SQuAD scoring ignores punctuation anyway.
    """
    while start < end and (context[start].isspace() or context[start] in EDGE_OPEN):
        start += 1
    while end > start and (context[end - 1].isspace() or context[end - 1] in EDGE_CLOSE):
        end -= 1
    return start, end


def _lstrip_offsets(context: str, offsets: list[tuple[int, int]]) -> list[list[int]]:
    """Offsets of sentencepiece pieces may include the leading space ("▁word"); drop it. Rows are
    ``[start, end]`` lists, the form the feature column stores (windows share them by slicing)."""
    out = []
    for s, e in offsets:
        while s < e and context[s].isspace():
            s += 1
        out.append([s, e])
    return out


def featurize(batch: dict[str, list], tokenizer: Any, max_length: int, doc_stride: int,
              eos_id: int) -> dict[str, list]:
    """One row per window: ids, the context-token offsets, start/end targets, example id.

    An answer whose edge falls inside a token is trained on the covering tokens and flagged
    ``answer_aligned=False`` (reported as answers that cannot align to token boundaries).
    """
    q_enc = tokenizer(batch["question"], add_special_tokens=False)["input_ids"]
    c_enc = tokenizer(batch["context"], add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list] = {k: [] for k in (
        "input_ids", "offsets", "context_start", "start", "end", "example_id", "answer_aligned")}
    for q_ids, c_ids, c_off, context, answers, ex_id in zip(
            q_enc, c_enc["input_ids"], c_enc["offset_mapping"], batch["context"],
            batch["answers"], batch["id"]):
        q_ids = list(q_ids)[: max_length // 2]
        c_ids = list(c_ids)
        c_off = _lstrip_offsets(context, c_off)
        room = max_length - len(q_ids) - 2
        span = None
        if answers["text"]:
            a_start = answers["answer_start"][0]
            span = answer_token_span(context, c_off, a_start, a_start + len(answers["text"][0]))
        step = max(room - doc_stride, 1)
        begin = 0
        while True:
            stop = min(begin + room, len(c_ids))  # the window: context tokens [begin, stop)
            ctx0 = len(q_ids) + 1
            ids = q_ids + [eos_id] + c_ids[begin:stop] + [eos_id]
            start = end = 0
            if span is not None and begin < stop and begin <= span[0] and span[1] <= stop - 1:
                start, end = ctx0 + span[0] - begin, ctx0 + span[1] - begin
            out["input_ids"].append(ids)
            out["offsets"].append(c_off[begin:stop])
            out["context_start"].append(ctx0)
            out["start"].append(start)
            out["end"].append(end)
            out["example_id"].append(ex_id)
            out["answer_aligned"].append(span is not None and span[2])
            if begin + room >= len(c_ids):
                break
            begin += step
    return out


def decode_answers(start_logits: list[np.ndarray], end_logits: list[np.ndarray],
                   features: Any, contexts: dict[str, str], n_best: int,
                   max_answer_length: int) -> dict[str, str]:
    """Best answer text per example id over all of its windows."""
    best: dict[str, tuple[float, str]] = {}
    for i in range(len(features)):
        feat = features[i]
        ex_id, offsets, ctx0 = feat["example_id"], feat["offsets"], feat["context_start"]
        s_log, e_log = start_logits[i], end_logits[i]
        n_ctx = len(offsets)
        s_ctx = s_log[ctx0: ctx0 + n_ctx]
        e_ctx = e_log[ctx0: ctx0 + n_ctx]
        starts = np.argsort(s_ctx)[::-1][:n_best]
        ends = np.argsort(e_ctx)[::-1][:n_best]
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_ctx[s] + e_ctx[e])
                if ex_id not in best or score > best[ex_id][0]:
                    a, b = trim_span(contexts[ex_id], offsets[s][0], offsets[e][1])
                    text = contexts[ex_id][a:b]
                    best[ex_id] = (score, text)
        best.setdefault(ex_id, (float("-inf"), ""))
    return {k: v[1] for k, v in best.items()}


# SQuAD v1.1 evaluation (answer normalisation, exact match, token F1), as in the official script.
def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def compute_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """SQuAD exact match and F1 in percent, each the max over the gold answers."""
    em = f1 = 0.0
    for ex_id, golds in references.items():
        pred = predictions.get(ex_id, "")
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(_f1(pred, g) for g in golds)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


class QuestionAnsweringTask(TaskKind):
    kind = "qa"
    prediction_format = "squad"
    plain_text = False

    def view(self, ds: datasets.Dataset, source: str, labelled: bool = True) -> datasets.Dataset:
        needed = ["context", "question"] + (["id", "answers"] if labelled else [])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(f"{source}: field(s) {missing} not found (the records have {ds.column_names}); "
                            "QA JSON lines hold 'id', 'context', 'question' and 'answers' "
                            "({'text': [...], 'answer_start': [...]}; not needed to predict)")
        if "id" not in ds.column_names:  # examples to predict: their position is their id
            return ds.add_column("id", [str(i) for i in range(len(ds))])
        return ds if ds.features["id"] == datasets.Value("string") else ds.cast_column("id", datasets.Value("string"))

    def unlabelled(self, batch: dict[str, list], labels: list[str], source: str) -> dict[str, list]:
        return {**batch, "answers": [{"text": [], "answer_start": []}] * len(batch["context"])}

    def blank(self, example: dict[str, Any]) -> bool:
        return not (example["context"] or "").strip() or not (example["question"] or "").strip()

    def blank_record(self, example: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(example["id"]), "question": example["question"] or "", "prediction": None,
                "empty": True}

    def featurize(self, batch: dict[str, list], tokenizer: Any, labels: list[str],
                  eos_id: int) -> dict[str, list]:
        return featurize(batch, tokenizer, self.cfg.max_length, self.cfg.doc_stride, eos_id)

    def feature_types(self) -> datasets.Features:
        ints = datasets.Sequence(datasets.Value("int32"))
        return datasets.Features({
            "input_ids": ints, "offsets": datasets.Sequence(ints), "context_start": datasets.Value("int32"),
            "start": datasets.Value("int32"), "end": datasets.Value("int32"),
            "example_id": datasets.Value("string"), "answer_aligned": datasets.Value("bool")})

    def targets(self, rows: list[dict], width: int) -> torch.Tensor:
        return torch.tensor([[r["start"], r["end"]] for r in rows], dtype=torch.long)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean of the start and end cross-entropy, summed over windows."""
        logits = logits.float()
        start = F.cross_entropy(logits[..., 0], target[:, 0], reduction="sum")
        end = F.cross_entropy(logits[..., 1], target[:, 1], reduction="sum")
        return (start + end) / 2

    def label_count(self, target: torch.Tensor) -> int:
        return target.shape[0]

    def _answers(self, outputs: list[np.ndarray], features: Any, examples: datasets.Dataset) -> dict[str, str]:
        contexts = {ex["id"]: ex["context"] for ex in examples}
        return decode_answers([o[:, 0] for o in outputs], [o[:, 1] for o in outputs], features, contexts,
                              self.cfg.n_best, self.cfg.max_answer_length)

    def evaluate(self, outputs: list[np.ndarray], features: datasets.Dataset,
                 examples: datasets.Dataset, labels: list[str]) -> tuple[dict[str, float], list[dict]]:
        answers = self._answers(outputs, features, examples)
        refs = {ex["id"]: ex["answers"]["text"] for ex in examples}
        metrics = compute_metrics(answers, refs)
        aligned = {f for f, ok in zip(features["example_id"], features["answer_aligned"]) if ok}
        metrics["answers_not_on_token_boundaries"] = float(len(refs) - len(aligned & set(refs)))
        preds = [{"id": k, "prediction": answers.get(k, ""), "answers": v} for k, v in refs.items()]
        return metrics, preds

    def predict(self, outputs: list[np.ndarray], features: list[dict],
                examples: datasets.Dataset, labels: list[str]) -> list[dict[str, Any]]:
        answers = self._answers(outputs, features, examples)
        return [{"id": ex["id"], "question": ex["question"], "prediction": answers.get(ex["id"], "")}
                for ex in examples]
