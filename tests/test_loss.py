"""The chunked next-token loss (model/loss.py): the same loss and gradients as cross-entropy over
the full fp32 logits, without ever holding (tokens x vocabulary) logits, also under ZeRO-3."""

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, resolve_model_config
from model.loss import chunked_cross_entropy
from model.transformer import build_transformer
from tests.harness import run_on_ranks


def full_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: today's loss over the full logits, upcast to fp32."""
    return F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten())


def _inputs(dtype: torch.dtype, batch: int = 3, seq: int = 37, dim: int = 24, vocab: int = 101):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, seq, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets):
    loss = fn(hidden, weight, targets)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("chunk_tokens", [1, 10, 64, 111, 500])  # 111 = all 3 x 37 tokens; 10, 64 do not divide it
def test_chunked_equals_full_cross_entropy_fp32(chunk_tokens):
    hidden, weight, targets = _inputs(torch.float32)
    want = _loss_and_grads(full_cross_entropy, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_tokens), hidden, weight, targets)
    # fp32 throughout: only the order of the sums differs (per-chunk logsumexp and loss partial
    # sums, the weight gradient accumulated chunk by chunk): a few fp32 ulps of values of order 1
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_chunked_equals_full_cross_entropy_bf16():
    hidden, weight, targets = _inputs(torch.bfloat16)
    want = _loss_and_grads(full_cross_entropy, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 16), hidden, weight, targets)
    # the loss is fp32 from the same bf16 logits in both: fp32 rounding only
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    # gradients come out in bf16 (8 bits of mantissa): the weight gradient is summed over chunks
    # in fp32 and rounded once, the full path rounds one bf16 matmul, so the two differ by about
    # one bf16 ulp (2^-8 relative) of the largest entries
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2 ** -7, atol=2 ** -8 * w.abs().max().item())


def test_loss_scale_reaches_the_gradients():
    """Backward scales the stored gradients by the incoming one (a loss scale, or loss / accum)."""
    hidden, weight, targets = _inputs(torch.float32)
    (full,) = torch.autograd.grad(full_cross_entropy(hidden, weight, targets) * 1024.0, hidden)
    (chunked,) = torch.autograd.grad(chunked_cross_entropy(hidden, weight, targets, 10) * 1024.0, hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6 * 1024)


def test_no_grad_and_bad_arguments():
    hidden, weight, targets = _inputs(torch.float32)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, 10)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, full_cross_entropy(hidden, weight, targets).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_cross_entropy(hidden, weight, targets, 0)
    with pytest.raises(ValueError, match="do not match"):
        chunked_cross_entropy(hidden, weight, targets[:, 1:], 10)


def _tiny(tie: bool):
    cfg = resolve_model_config(ModelConfig(preset="tiny", tie_embeddings=tie), vocab_size=384)
    return build_transformer(cfg, seed=3, dtype=torch.float32), cfg


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_tokens", [0, 7])
def test_model_forward_with_targets_equals_cross_entropy_of_its_logits(tie, chunk_tokens):
    model, cfg = _tiny(tie)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    want = F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model(inputs, targets=targets, loss_chunk_tokens=chunk_tokens)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    # fp32: the chunked loss reorders sums only (see the fp32 test above); chunk 0 is the same ops
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _largest_allocation_and_saved(fn) -> tuple[int, int]:
    """Bytes of the largest single CPU allocation of any op in forward + backward, and elements of
    the largest tensor saved for backward."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] = max(saved[0], t.numel())
        return t

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    return largest, saved[0]


def test_no_tokens_by_vocabulary_logits_are_allocated_or_saved():
    batch, seq, dim, vocab, chunk = 4, 256, 16, 512, 64  # N x V = 1024 x 512, far above V x C and chunk x V
    hidden, weight, targets = _inputs(torch.float32, batch, seq, dim, vocab)
    n_by_v = batch * seq * vocab
    full_alloc, full_saved = _largest_allocation_and_saved(lambda: full_cross_entropy(hidden, weight, targets))
    alloc, saved = _largest_allocation_and_saved(lambda: chunked_cross_entropy(hidden, weight, targets, chunk))
    assert full_alloc >= 4 * n_by_v and full_saved >= n_by_v  # the check sees the full logits
    assert saved < n_by_v // 8
    assert alloc <= 4 * max(chunk * vocab, vocab * dim, batch * seq * dim)  # one chunk's fp32 logits at most


def _zero3_loss_and_grads(rank: int, world_size: int) -> list[dict]:
    """ZeRO-3 engine (output head partitioned, gathered only inside its forward): the chunked loss
    and its full gradients, beside a plain model's full-logits loss on the same tokens."""
    import deepspeed

    from training.config import OptimConfig, TrainConfig
    from training.deepspeed_config import build_deepspeed_config
    from training.engine import build_engine
    from training.optim import build_optimizer, param_groups
    from training.steps.language_model import build_language_model

    deepspeed.init_distributed(dist_backend="gloo")  # joins the harness's process group
    out = []
    for tie in (False, True):
        cfg = resolve_model_config(ModelConfig(preset="tiny", tie_embeddings=tie), vocab_size=384)
        train, optim = TrainConfig(zero_stage=3, micro_batch_size=2, device="cpu"), OptimConfig()
        ds_config = build_deepspeed_config(train, optim, world_size)
        model = build_language_model(cfg, ds_config, seed=3, device=torch.device("cpu"))
        optimizer = build_optimizer(param_groups(model, optim), optim, 3)
        engine, _ = build_engine(model, ds_config, optimizer)
        tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
        loss = engine(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk_tokens=7)
        engine.backward(loss)
        grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        plain = build_transformer(cfg, seed=3, dtype=torch.float32)
        want = F.cross_entropy(plain(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        want.backward()
        out.append({"loss": loss.detach(), "want": want.detach(), "grads": grads,
                    "want_grads": {n: p.grad for n, p in plain.named_parameters()}})
    # numpy arrays: torch tensors would cross the queue as shared memory of a process that exits
    return [{k: {n: g.numpy() for n, g in v.items()} if isinstance(v, dict) else v.numpy() for k, v in r.items()}
            for r in out]


@pytest.mark.slow
@pytest.mark.distributed
def test_chunked_loss_under_zero3_equals_plain_model():
    for rank_results in run_on_ranks(_zero3_loss_and_grads, 2, timeout=300):
        for arrays in rank_results:  # untied, then tied
            r = {k: {n: torch.from_numpy(a) for n, a in v.items()} if isinstance(v, dict) else torch.from_numpy(v)
                 for k, v in arrays.items()}
            # fp32; both ranks see the same tokens, so the averaged gradients are the local ones
            torch.testing.assert_close(r["loss"], r["want"], rtol=1e-5, atol=1e-6)
            assert r["grads"].keys() == r["want_grads"].keys()
            for name, want in r["want_grads"].items():
                torch.testing.assert_close(r["grads"][name], want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
