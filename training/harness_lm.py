"""Our model as an lm-evaluation-harness language model (``lm_eval.api.model.TemplateLM``).

Imported only by the evaluation code (:mod:`training.harness_eval`), never at start-up: the
harness pulls in ``datasets``, ``evaluate`` and many task modules.

The wrapper follows the conventions of the harness's Hugging Face backend (``HFLM``), so that a
model scores the same through either: contexts are encoded without a BOS, trailing spaces move
from the context to the continuation (``TemplateLM._encode_pair``), an empty context becomes the
prefix token, inputs longer than the model's context are cut from the left, and a generation is
the decoded new tokens cut at the first stop sequence. The one choice of ours: the prefix token
is EOS (the token shards join documents with EOS and use no BOS, so a document start follows
EOS in pretraining).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from crucible.errors import UserError
from model.generate import SamplingConfig, TextTokenizer, generate
from model.transformer import Transformer

LoglikelihoodRequest = tuple[Any, list[int], list[int]]  # (request strings, context ids, continuation ids)


class CrucibleLM(TemplateLM):
    """Scores and generates with ``model`` (any device and dtype, used as it is) and
    ``tokenizer``; ``batch_size`` sequences per forward pass."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, batch_size: int = 16,
                 max_gen_toks: int = 256, seed: int = 1234) -> None:
        super().__init__()
        if batch_size <= 0:
            raise UserError(f"the evaluation batch size must be positive (got {batch_size})")
        if tokenizer.eos_id is None:
            raise UserError("the model's tokenizer has no EOS token, which evaluation needs as the "
                            "prefix of empty contexts and as the end of generations")
        self.model, self.tokenizer = model, tokenizer
        self._batch_size, self._max_gen_toks, self.seed = batch_size, max_gen_toks, seed
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @classmethod
    def from_model_dir(cls, path: str, device: str = "cpu", dtype: str | None = None,
                       batch_size: int = 16) -> CrucibleLM:
        """The model and tokenizer of a model, run or Hugging Face directory."""
        from model.io import find_model_dir, load_model_dir
        from model.transformer import DTYPES

        model_dir = find_model_dir(path)
        model, _ = load_model_dir(model_dir, device=device)
        if dtype is not None:
            model = model.to(DTYPES[dtype])
        return cls(model.eval(), TextTokenizer(model_dir), batch_size=batch_size)

    # ------------------------------------------------------------------ what the harness asks
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.max_seq_len)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: int | list[int]) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else list(tokens))

    # ------------------------------------------------------------------------ log-likelihoods
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[LoglikelihoodRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the
        continuation) per request, longest first in batches of ``batch_size``."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            scored = self._score_batch([requests[i] for i in rows])
            for i, answer in zip(rows, scored):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results  # type: ignore[return-value]

    def _score_batch(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        inputs, targets = [], []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("a log-likelihood request needs a context and a continuation token")
            ids = (context + continuation)[-(self.max_length + 1):]  # cut from the left
            inputs.append(ids[:-1])
            targets.append(continuation[-len(ids) + 1:] if len(continuation) >= len(ids) else continuation)
        width = max(len(ids) for ids in inputs)
        tokens = torch.full((len(inputs), width), self.pad_id, dtype=torch.long, device=self.device)
        for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)  # right padding: causal
        hidden = self.model.hidden_states(tokens)  # (B, T, C)
        # only the continuation's positions go through the output head (the largest matmul)
        picked = torch.cat([hidden[row, len(ids) - len(cont):len(ids)]
                            for row, (ids, cont) in enumerate(zip(inputs, targets))])  # (N, C)
        logprobs = self.model.lm_head(picked).float().log_softmax(-1)  # (N, V)
        out, start = [], 0
        for cont in targets:
            rows = logprobs[start:start + len(cont)]  # (len(cont), V)
            start += len(cont)
            target = torch.tensor(cont, dtype=torch.long, device=rows.device)
            chosen = rows.gather(-1, target[:, None]).squeeze(-1)
            out.append((float(chosen.sum()), bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks): disjoint windows of the model's
        context, each scored after the text before it, the first after the prefix token."""
        results = []
        for request in requests:
            (string,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(logprob for logprob, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, batched with the KV-cache
        decoder of :mod:`model.generate`; a row ends at EOS or once its text holds a stop
        sequence, and the text is cut at the first one."""
        groups: dict[str, list[int]] = {}  # requests with the same generation settings batch together
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for rows in groups.values():
            context_texts = [requests[i].args[0] for i in rows]
            gen_kwargs = requests[rows[0]].args[1]
            texts = self._generate_group(context_texts, gen_kwargs)
            for i, context, text in zip(rows, context_texts, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
        return results  # type: ignore[return-value]

    def _generate_group(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
        stops = [s for s in until if s]
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if max_gen_toks >= self.max_length:
            raise UserError(f"a task asks for {max_gen_toks} generated tokens, which leaves no room "
                            f"for the prompt in the model's context of {self.max_length} tokens")
        sampling = SamplingConfig(max_new_tokens=max_gen_toks, eos_id=self.eot_token_id, seed=self.seed)
        if kwargs.get("do_sample"):
            sampling = replace(sampling, temperature=float(kwargs.get("temperature") or 1.0),
                               top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"))
        max_context = self.max_length - max_gen_toks
        encoded = [(self.tok_encode(c) or [self.prefix_token_id])[-max_context:] for c in contexts]
        order = sorted(range(len(contexts)), key=lambda i: -len(encoded[i]))
        texts: list[str] = [""] * len(contexts)
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]

            def reached_stop(row: int, new_ids: list[int]) -> bool:
                text = self.tok_decode(new_ids)
                return any(s in text for s in stops)

            new = generate(self.model, [encoded[i] for i in rows], sampling, pad_id=self.pad_id,
                           stop=reached_stop if stops else None)
            for i, ids in zip(rows, new):
                texts[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
        return texts
