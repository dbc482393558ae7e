"""Text generation with a KV cache: greedy, temperature, top-k, top-p, stop at EOS, batched
prompts of different lengths.

Prompts are left-padded to a common length. Each real token's rotary position counts only the
real tokens before it (as Hugging Face ``generate`` does from the attention mask), and no query
ever attends to padding, so a prompt's continuation does not depend on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from crucible.errors import DataError
from model.transformer import KVCache, Transformer


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature`` 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = 2
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf; (B, V) -> (B, V).

    Nucleus: the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    most likely token is always kept), as Hugging Face's ``TopPLogitsWarper``.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """Choose one token per row from the last-position logits (B, V) -> (B,)."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            valid[row, width - len(prompt):] = True
    return tokens, valid


def _last_logits(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the last position only (the output head is the largest matmul of a step)."""
    hidden = model.hidden_states(tokens, positions=positions, cache=cache, mask=mask)
    return model.lm_head(hidden[:, -1:])  # (B, 1, V)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], sampling: SamplingConfig,
             pad_id: int = 0, stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New token ids for each prompt (token ids, each non-empty), up to ``max_new_tokens``,
    stopping at ``eos_id`` (which is not included in the result).

    ``stop(row, new_ids)``, when given, is asked after each token a row receives; True ends that
    row there, keeping the token (stop sequences: the caller decodes ``new_ids`` and looks for
    its stop strings, then cuts the text at the first one).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. start it with BOS)")
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens, valid = _left_pad(prompts, pad_id, device)
    batch, width = tokens.shape
    total = width + sampling.max_new_tokens
    cache = KVCache.empty(model.cfg, batch, total, device, next(model.parameters()).dtype)
    keys_valid = torch.zeros((batch, total), dtype=torch.bool, device=device)
    keys_valid[:, :width] = valid

    # Prefill: causal, no attention to padding (a pad query sees itself, to stay finite).
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
    logits = _last_logits(model, tokens, positions, cache, mask[:, None])  # (B, 1, V)
    next_pos = valid.sum(-1)  # (B,)

    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(sampling.max_new_tokens):
        chosen = next_tokens(logits[:, -1], sampling, generator)  # (B,)
        if sampling.eos_id is not None:
            done |= chosen == sampling.eos_id
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(chosen[row]))
            if stop is not None and stop(row, out[row]):
                done[row] = True
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        keys_valid[:, width + step] = True
        mask = keys_valid[:, None, None, : width + step + 1]  # (B, 1, 1, S)
        logits = _last_logits(model, chosen[:, None], next_pos[:, None], cache, mask)
        next_pos = next_pos + 1
    return out


class TextTokenizer:
    """The tokenizer of a model directory: sentencepiece ``tokenizer.model`` when present (fast,
    exact), else the Hugging Face tokenizer files (``AutoTokenizer``)."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        if (model_dir / "tokenizer.model").is_file():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
            self._encode, self._decode = sp.encode, sp.decode
            ids = (sp.bos_id(), sp.eos_id(), sp.pad_id())
        elif (model_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
            self._encode = lambda text: tok(text, add_special_tokens=False).input_ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
            ids = tuple(-1 if i is None else i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
        else:
            raise DataError(
                f"{model_dir} has no tokenizer (tokenizer.model or tokenizer.json); save the model "
                "directory with its tokenizer (save_model_dir(..., tokenizer_dir=...))"
            )
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def completion(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The text ``new_ids`` add after the prompt, with the space a word-initial piece
        carries (decoding ``new_ids`` alone would drop it)."""
        prompt = self.decode(prompt_ids)
        full = self.decode(prompt_ids + new_ids)
        return full[len(prompt):] if full.startswith(prompt) else self.decode(new_ids)


def generate_text(model_dir: str | Path, prompts: list[str], sampling: SamplingConfig,
                  start: Literal["eos", "bos", "none"] = "eos", device: str = "cpu",
                  dtype: str | None = None, batch_size: int = 16) -> Iterator[dict[str, Any]]:
    """Continue each text prompt with the model (and tokenizer) of ``model_dir``; yields one
    row per prompt (prompt, completion, token ids), ``batch_size`` prompts per batch.

    ``start``: the token put before each prompt. The token shards join documents with EOS and
    use no BOS, so a document start follows EOS: ``eos`` (default) matches pretraining.
    """
    from model.io import find_model_dir, load_model_dir
    from model.transformer import DTYPES

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model_dir = find_model_dir(model_dir)
    model, cfg = load_model_dir(model_dir, device=device)
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    model.eval()
    tokenizer = TextTokenizer(model_dir)
    prefix_id = {"eos": tokenizer.eos_id, "bos": tokenizer.bos_id, "none": None}[start]
    encoded = [([prefix_id] if prefix_id is not None else []) + tokenizer.encode(p) for p in prompts]
    for text, ids in zip(prompts, encoded):
        if not ids:
            raise DataError(f"prompt {text!r} encodes to no tokens; use --start eos or bos")
        if max(ids) >= cfg.vocab_size:
            raise DataError(f"the tokenizer in {model_dir} yields id {max(ids)} but the model's "
                            f"vocabulary has {cfg.vocab_size}: tokenizer and weights do not match")
    if sampling.eos_id is not None and tokenizer.eos_id is not None:
        sampling = replace(sampling, eos_id=tokenizer.eos_id)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for first in range(0, len(prompts), batch_size):
        batch = encoded[first:first + batch_size]
        for text, ids, new in zip(prompts[first:], batch, generate(model, batch, sampling, pad_id=pad)):
            yield {"prompt": text, "completion": tokenizer.completion(ids, new),
                   "prompt_token_ids": ids, "new_token_ids": new}
