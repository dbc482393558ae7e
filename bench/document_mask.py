"""Document masking's effect on validation loss and training speed: causal vs document attention.

Two copies of the same model (same shape, same initial weights) train side by side on the same
batches in the same order, with the same optimizer and schedule; the only difference is
``model.attention`` (causal: a token sees the whole packed sample before it; document: only its
own document). Steps alternate between the two so that load from other processes hits both
alike; tokens/s is the median over the steps after warm-up (forward, backward and optimizer
step; data loading excluded, it is shared). Then both are scored on the whole validation split
twice, with causal and with document attention (the same weights under the other mask), so the
table separates what training with the mask changed from what scoring with it changes.

On CPU document attention is ``F.scaled_dot_product_attention`` with a dense (B, 1, T, T) boolean
mask; on CUDA it is FlexAttention with a block mask (see model/attention.py), so the speed ratio
measured here says nothing about GPUs.

    python bench/document_mask.py                       # tiny preset, token shards built from data/sample
    python bench/document_mask.py --preset cpu-small --steps 150
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

# This file is bench/document_mask.py: keep its folder off sys.path so ``model`` is the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("causal", "document")


def build_models(preset: str, vocab_size: int, eos_id: int, seed: int) -> dict:
    from model.config import ModelConfig, resolve_model_config
    from model.transformer import build_transformer

    configs = {mode: resolve_model_config(ModelConfig(preset=preset, attention=mode, eos_id=eos_id),
                                          vocab_size=vocab_size) for mode in MODES}
    return {mode: build_transformer(cfg, seed=seed, dtype=torch.float32).train()
            for mode, cfg in configs.items()}, configs


def optimizer_for(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, lr: float) -> tuple[float, float]:
    """One optimizer step on ``tokens`` (B, T + 1); returns (loss, seconds)."""
    start = time.perf_counter()
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    return loss.item(), time.perf_counter() - start


@torch.no_grad()
def validation_loss(model: torch.nn.Module, manifest: Path, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) over every validation sample."""
    from data_pipeline.loader.config import LoaderConfig
    from data_pipeline.loader.evaluation import build_eval_loader

    model.eval()
    nats, count = 0.0, 0
    for batch in build_eval_loader(LoaderConfig(manifests=[str(manifest)]), batch_size, 0, 1):
        tokens = batch.tokens[batch.keep]
        if len(tokens):
            logits = model(tokens[:, :-1])
            nats += F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
            count += tokens[:, 1:].numel()
    model.train()
    return nats / count


def with_attention(model: torch.nn.Module, cfg, mode: str) -> torch.nn.Module:
    """The same weights under ``mode`` attention."""
    from model.transformer import Transformer

    twin = Transformer(cfg.model_copy(update={"attention": mode}))
    twin.load_state_dict(model.state_dict())
    return twin


def documents_per_sample(manifest: Path, eos_id: int, batch_size: int) -> float:
    """Mean number of documents (whole or cut) per validation sample."""
    from data_pipeline.loader.config import LoaderConfig
    from data_pipeline.loader.evaluation import build_eval_loader
    from model.attention import document_ids

    documents, rows = 0, 0
    for batch in build_eval_loader(LoaderConfig(manifests=[str(manifest)]), batch_size, 0, 1):
        tokens = batch.tokens[batch.keep][:, :-1]  # the model's inputs
        documents += int(document_ids(tokens, eos_id).amax(dim=1).add(1).sum())
        rows += len(tokens)
    return documents / max(rows, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=None,
                        help="token-shard manifest.json (default: build one from data/sample, seq_len 256)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from data_pipeline.loader.config import LoaderConfig
    from data_pipeline.loader.train import build_train_loader

    manifest = args.manifest
    if manifest is None:
        from tests.datasets import make_token_dataset

        manifest = make_token_dataset(ROOT / "runs" / "bench-tokens-256", seq_len=256)
    loader = build_train_loader(LoaderConfig(manifests=[str(manifest)]), args.batch_size, 0, 1)
    eos_id = int(loader.tokenizer["eos_id"])
    models, configs = build_models(args.preset, int(loader.vocab_size), eos_id, args.seed)
    opts = {mode: optimizer_for(models[mode], args.lr) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    last: dict[str, float] = {}
    batches = iter(loader)
    for step in range(args.steps):
        tokens = next(batches)
        lr = lr_at(step, args.steps, max(args.steps // 10, 1), args.lr)
        order = MODES if step % 2 == 0 else MODES[::-1]
        for mode in order:
            last[mode], seconds = train_step(models[mode], opts[mode], tokens, lr)
            times[mode].append(seconds)
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}/{args.steps}: loss " + ", ".join(f"{m} {last[m]:.4f}" for m in MODES),
                  file=sys.stderr, flush=True)
    tokens_per_step = args.batch_size * loader.seq_len
    speed = {mode: tokens_per_step / statistics.median(times[mode][args.warmup:]) for mode in MODES}

    val = {(trained, scored): validation_loss(with_attention(models[trained], configs[trained], scored),
                                              manifest, args.batch_size)
           for trained in MODES for scored in MODES}
    docs = documents_per_sample(manifest, eos_id, args.batch_size)
    print(f"{args.preset}, {args.steps} steps x {args.batch_size} x {loader.seq_len} tokens, same batches and "
          f"initial weights, {args.threads} threads; validation: {docs:.2f} documents per sample")
    print(f"{'trained with':>13} {'tokens/s':>9} {'last train loss':>16} {'val (causal)':>13} {'val (document)':>15}")
    for mode in MODES:
        print(f"{mode:>13} {speed[mode]:>9.0f} {last[mode]:>16.4f} {val[mode, 'causal']:>13.4f} "
              f"{val[mode, 'document']:>15.4f}")
    print(f"document / causal: tokens/s {speed['document'] / speed['causal']:.3f}x; validation loss, each scored "
          f"with its own attention: {val['document', 'document']:.4f} vs {val['causal', 'causal']:.4f} "
          f"({val['document', 'document'] - val['causal', 'causal']:+.4f} nats, ratio "
          f"{val['document', 'document'] / val['causal', 'causal']:.4f}x)")


if __name__ == "__main__":
    main()
