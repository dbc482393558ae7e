"""Text generation with a KV cache: greedy, temperature, top-k, top-p, stop at EOS, batched
prompts of different lengths.

Prompts are left-padded to a common length. Each real token's rotary position counts only the
real tokens before it (as Hugging Face ``generate`` does from the attention mask), and no query
ever attends to padding, so a prompt's continuation does not depend on what it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], sampling: SamplingConfig,
             pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (token ids, each non-empty), up to ``max_new_tokens``,
    stopping at ``eos_id`` (which is not included in the result)."""
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
    logits = model(tokens, positions=positions, cache=cache, mask=mask[:, None])  # (B, P, V)
    next_pos = valid.sum(-1)  # (B,)

    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(sampling.max_new_tokens):
        chosen = next_tokens(logits[:, -1], sampling, generator)  # (B,)
        if sampling.eos_id is not None:
            done |= chosen == sampling.eos_id
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(chosen[row]))
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        keys_valid[:, width + step] = True
        mask = keys_valid[:, None, None, : width + step + 1]  # (B, 1, 1, S)
        logits = model(chosen[:, None], positions=next_pos[:, None], cache=cache, mask=mask)
        next_pos = next_pos + 1
    return out
