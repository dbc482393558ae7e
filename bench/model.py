"""Forward+backward throughput of our Transformer beside Hugging Face ``LlamaForCausalLM``.

Both models hold identical weights (converted exactly) and the same shape, run the same batch
and the same loss (cross-entropy computed outside the model), with the same thread count,
eager (neither compiled) or both compiled (--compile), alternating step by step so that noise
from other processes hits both alike. MFU is against a fp32 matmul peak measured in the same run.

    python bench/model.py                       # cpu-small preset, batch 8 x 256 tokens
    python bench/model.py --preset tiny --steps 5 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# This file is bench/model.py: keep its folder off the import path so that ``model`` is the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch
import torch.nn.functional as F


def matmul_peak_flops(n: int = 2048, seconds: float = 2.0, clock=time.perf_counter) -> float:
    """Best observed fp32 GEMM FLOP/s over ``seconds`` (n x n x n), timed by ``clock``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / max(clock() - start, 1e-9))
    return best


def build_pair(preset: str, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.config import ModelConfig, resolve_model_config
    from model.hf_mapping import to_hf_config, to_hf_state_dict
    from model.transformer import build_transformer

    cfg = resolve_model_config(ModelConfig(preset=preset), vocab_size=vocab_size)
    ours = build_transformer(cfg, seed=seed).train()
    hf_cfg = LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items()
                            if k not in ("architectures", "model_type", "dtype", "rope_theta")})
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).train()
    missing, unexpected = hf.load_state_dict(
        {k: v.clone() for k, v in to_hf_state_dict(ours.state_dict(), cfg).items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return cfg, ours, hf


def step(fn, tokens: torch.Tensor, clock=time.perf_counter) -> float:
    start = clock()
    logits = fn(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time steps by this process's CPU time, which other processes on a "
                        "shared machine do not inflate (meaningful with --threads 1)")
    args = parser.parse_args()

    from model.flops import flops_per_token

    torch.set_num_threads(args.threads)
    cfg, ours, hf = build_pair(args.preset, args.vocab_size, args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        diff = (ours(tokens[:, :-1]) - hf(tokens[:, :-1]).logits).abs().max().item()
    ours_fn = ours
    hf_fn = lambda t: hf(input_ids=t, use_cache=False).logits
    if args.compile:
        ours_fn, hf_fn = torch.compile(ours), torch.compile(hf_fn)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(args.warmup + args.steps):
        for name, fn, model in (("ours", ours_fn, ours), ("hf", hf_fn, hf)):
            model.zero_grad(set_to_none=True)
            elapsed = step(fn, tokens, clock)
            if i >= args.warmup:
                times[name].append(elapsed)
    peak = matmul_peak_flops(clock=clock)
    n_tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    print(f"preset {args.preset} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"vocab {cfg.vocab_size}), batch {args.batch_size} x {args.seq_len}, threads "
          f"{args.threads}, {'compiled' if args.compile else 'eager'}, {args.steps} steps, "
          f"{args.clock} clock")
    print(f"max |logits ours - hf| = {diff:.2e}; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"{fpt / 1e6:.2f} MFLOP/token (train)")
    rates, best = {}, {}
    for name in ("ours", "hf"):
        med, fastest = statistics.median(times[name]), min(times[name])
        rates[name], best[name] = n_tokens / med, n_tokens / fastest
        print(f"{name:>5}: {rates[name]:9.0f} tokens/s median, {best[name]:9.0f} best step  "
              f"(median step {med * 1e3:.0f} ms)  MFU {rates[name] * fpt / peak:.1%} median, "
              f"{best[name] * fpt / peak:.1%} best")
    print(f"ratio ours / hf: {rates['ours'] / rates['hf']:.2f}x (median steps), "
          f"{best['ours'] / best['hf']:.2f}x (best steps)")


if __name__ == "__main__":
    main()
