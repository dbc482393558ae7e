"""The GPU path end to end, one line per check (driven by ``bench/gpu_check.sh``).

    python bench/gpu_check.py prepare --out runs/gpu_check      # CPU only: data and configs
    python bench/gpu_check.py model   --out runs/gpu_check      # CPU fp32 vs GPU fp32 vs GPU bf16
    python bench/gpu_check.py steps   --out runs/gpu_check      # launcher: GPU vs CPU, bf16, resume
    python bench/gpu_check.py speed   --out runs/gpu_check      # 1.3B shape: tokens/s, MFU, memory,
                                                                #   compile on/off, chunked/full loss

Each check prints ``PASS``/``FAIL``/``INFO`` lines and the process exits 1 when one failed.
``--device cpu`` runs the same code with the CPU standing in for the GPU (the test suite uses it
to check the plumbing; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

# This file is bench/gpu_check.py: keep its folder off sys.path so ``model`` is the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
ROOT = Path(_HERE).parent
sys.path.insert(0, str(ROOT))

VOCAB = 8000
SMALL_SEQ = 256
BIG_SEQ = 2048
FAILED: list[str] = []


def report(ok: bool | None, what: str, detail: str) -> None:
    """One line per check; ``ok`` None is information only."""
    tag = "INFO" if ok is None else "PASS" if ok else "FAIL"
    if ok is False:
        FAILED.append(what)
    print(f"{tag} {what}: {detail}", flush=True)


# ----------------------------------------------------------------------------- prepare (CPU)

def prepare(out: Path, big: bool = True) -> dict[str, Path]:
    """Token shards of the bundled sample (sequences of 256 and 2048 tokens, one tokenizer of
    8000 pieces) and the two pretraining configs the checks run; CPU only, idempotent."""
    from tests.datasets import make_token_dataset

    out.mkdir(parents=True, exist_ok=True)
    small = make_token_dataset(out / "data_small", seq_len=SMALL_SEQ, vocab_size=VOCAB)
    configs = {"small": out / "small.yaml"}
    configs["small"].write_text(json.dumps({
        "run_dir": str(out / "runs" / "small"),
        "data": {"manifests": [str(small)]},
        "model": {"preset": "cpu-small", "max_seq_len": SMALL_SEQ},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1},
        "train": {"max_steps": 16, "micro_batch_size": 8, "zero_stage": 1, "precision": "fp32",
                  "eval_every": 0, "eval_batches": 2},
        "checkpoint": {"every": 8, "keep_last": 2, "write_model_dir": False},
        "log": {"every": 1, "tensorboard": False},
    }, indent=2))
    if big:
        big_manifest = make_token_dataset(out / "data_big", seq_len=BIG_SEQ, vocab_size=VOCAB)
        configs["big"] = out / "big.yaml"
        configs["big"].write_text(json.dumps({
            "run_dir": str(out / "runs" / "big"),
            "data": {"manifests": [str(big_manifest)], "num_workers": 2},
            "model": {"preset": "1.3B", "max_seq_len": BIG_SEQ},
            "optim": {"lr": 3e-4},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"max_steps": 30, "micro_batch_size": 8, "zero_stage": 1, "precision": "bf16",
                      "eval_every": 0, "eval_batches": 1},
            "checkpoint": {"every": 0, "write_model_dir": False},
            "log": {"every": 1, "tensorboard": False},
        }, indent=2))
    for name, path in configs.items():
        report(None, f"prepared {name}", str(path))
    return configs


# ------------------------------------------------------------------------------ model check

def _forward_backward(model, tokens, dtype, flash: bool):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.zero_grad(set_to_none=True)
    backends = [SDPBackend.FLASH_ATTENTION] if flash else [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION,
                                                            SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends), torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    return logits.detach().float().cpu(), loss.item(), grads


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_model(device: str, layers: int, seq: int) -> None:
    """Forward + backward of the 1.3B layer shape (dim 2048, 16 heads, SwiGLU 5632) on CPU fp32,
    GPU fp32 (TF32 off) and GPU bf16 with the flash SDPA kernel forced, same weights and tokens."""
    import torch

    from model.config import ModelConfig, resolve_model_config
    from model.transformer import build_transformer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = resolve_model_config(ModelConfig(preset="1.3B", n_layers=layers, max_seq_len=seq), vocab_size=VOCAB)
    cpu_model = build_transformer(cfg, device="cpu", seed=0, dtype=torch.float32)
    gpu_model = build_transformer(cfg, device=device, seed=0, dtype=torch.float32)
    same_init = all(torch.equal(a, b.cpu()) for a, b in zip(cpu_model.parameters(), gpu_model.parameters()))
    report(same_init, "same initial weights on CPU and the device (same seed)", f"{layers} layers of the 1.3B shape")
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_loss, ref_grads = _forward_backward(cpu_model, tokens, torch.float32, flash=False)
    logits, loss, grads = _forward_backward(gpu_model, tokens.to(device), torch.float32, flash=False)
    grad_rel = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    report(_rel(logits, ref_logits) < 1e-4 and grad_rel < 1e-3, "fp32 device vs CPU",
           f"logits rel {_rel(logits, ref_logits):.2e} (tol 1e-4), worst gradient rel {grad_rel:.2e} (tol 1e-3), "
           f"loss {loss:.5f} vs {ref_loss:.5f}")
    if device == "cpu":
        report(None, "bf16 flash SDPA", "skipped on CPU (no flash kernel)")
        return
    logits_bf, loss_bf, grads_bf = _forward_backward(gpu_model, tokens.to(device), torch.bfloat16, flash=True)
    grad_rel = statistics.median(_rel(grads_bf[n], grads[n]) for n in grads)
    # bf16 rounds to 8 mantissa bits (2^-9 relative per operation); a loss within 1 % and
    # gradients within 5 % (median over tensors) of fp32 on random tokens; a wrong kernel or
    # cast (fp16 overflow, un-normalised softmax) is off by far more
    report(abs(loss_bf - loss) / loss < 1e-2 and grad_rel < 5e-2, "bf16 flash SDPA vs fp32 on the device",
           f"loss {loss_bf:.5f} vs {loss:.5f} (tol 1 %), median gradient rel {grad_rel:.2e} (tol 5e-2), "
           f"logits rel {_rel(logits_bf, logits):.2e}")


def check_document_attention(device: str, layers: int, seq: int) -> None:
    """Document attention (``model.attention: document``) with the device's kernel (FlexAttention
    with a block mask on CUDA, the dense mask on CPU): each document of a packed row scores as the
    document alone (fp32), then forward + backward tokens/s of document vs causal attention of the
    1.3B layer shape at ``seq`` tokens in bf16, on rows of 8 documents."""
    import time

    import torch

    from model.config import ModelConfig, resolve_model_config
    from model.transformer import build_transformer

    eos = 2
    cfg = resolve_model_config(ModelConfig(preset="tiny", attention="document", eos_id=eos, max_seq_len=512),
                               vocab_size=VOCAB)
    model = build_transformer(cfg, device=device, seed=0, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (150, 37, 201)]
    for d in docs:
        d[-1] = eos
    packed = torch.cat(docs)[None].to(device)
    with torch.no_grad():
        logits = model(packed).float()
        worst, start = 0.0, 0
        for d in docs:
            alone = model(d[None].to(device)).float()
            worst = max(worst, (logits[:, start:start + len(d)] - alone).abs().max().item())
            start += len(d)
    # fp32 on both paths; only the kernels' summation order differs (the CPU test bar is 1e-5)
    report(worst < 1e-4, "document attention: packed row = each document alone",
           f"max |logits difference| {worst:.2e} (tol 1e-4), kernel {'flex' if device != 'cpu' else 'dense'}")
    if device == "cpu":
        report(None, "document vs causal tokens/s", "skipped on CPU")
        return
    speeds = {}
    tokens = torch.randint(3, VOCAB, (1, seq + 1), generator=gen)
    tokens[0, torch.arange(seq // 8, seq + 1, seq // 8)] = eos  # 8 documents per row
    tokens = tokens.to(device)
    for attention in ("causal", "document"):
        big = resolve_model_config(ModelConfig(preset="1.3B", n_layers=layers, max_seq_len=seq, attention=attention,
                                               eos_id=eos), vocab_size=VOCAB)
        m = build_transformer(big, device=device, seed=0, dtype=torch.bfloat16)
        times = []
        for i in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(tokens[:, :-1], targets=tokens[:, 1:]).backward()
            torch.cuda.synchronize()
            if i >= 2:  # after the block mask's and the kernel's compilation
                times.append(time.perf_counter() - t0)
        speeds[attention] = seq / statistics.median(times)
        del m
    report(None, "document vs causal tokens/s (fwd+bwd, bf16)",
           f"{layers} layers of the 1.3B shape, {seq} tokens in 8 documents: document {speeds['document']:,.0f}, "
           f"causal {speeds['causal']:,.0f} tokens/s ({speeds['document'] / speeds['causal']:.2f}x)")


# ------------------------------------------------------------------------------ launcher runs

def launcher(config: Path, run_dir: Path, device: str, *overrides: str) -> dict[int, dict]:
    """One plain process of ``launcher/pretrain.py``; its per-step metrics."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, str(ROOT / "launcher" / "pretrain.py"), "--config", str(config),
           f"run_dir={run_dir}", f"train.device={'cpu' if device == 'cpu' else 'cuda'}", *overrides]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        report(False, f"launcher run {run_dir.name}", f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        return {}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def _losses_close(a: dict[int, dict], b: dict[int, dict], steps: range, rel: float) -> tuple[bool, float]:
    worst = max((abs(a[s]["train/loss"] - b[s]["train/loss"]) / b[s]["train/loss"] for s in steps),
                default=math.inf)
    return worst <= rel, worst


def check_steps(configs: dict[str, Path], out: Path, device: str, steps: int) -> None:
    """16 launcher steps on the device vs the CPU (fp32); bf16 vs fp32 on the device; a run
    stopped at step 8 and resumed continues the uninterrupted losses."""
    runs = out / "runs"
    span = range(1, steps + 1)
    common = (f"train.max_steps={steps}",)
    gpu = launcher(configs["small"], runs / "device_fp32", device, *common)
    cpu = launcher(configs["small"], runs / "cpu_fp32", "cpu", *common)
    bf16 = launcher(configs["small"], runs / "device_bf16", device, *common, "train.precision=bf16")
    if not (gpu and cpu and bf16):
        return
    # the same fp32 arithmetic in another order (GPU kernels vs CPU BLAS), amplified by AdamW
    # over 16 steps: measured differences are ~1e-4; a lost micro batch or a wrong average is ~1e-2
    ok, worst = _losses_close(gpu, cpu, span, 2e-3)
    report(ok, f"{steps} steps fp32 device vs CPU", f"worst loss rel diff {worst:.2e} (tol 2e-3)")
    ok, worst = _losses_close(bf16, gpu, span, 2e-2)
    report(ok, f"{steps} steps bf16 vs fp32 on the device", f"worst loss rel diff {worst:.2e} (tol 2e-2)")
    half = steps // 2
    resumed_dir = runs / "device_resumed"
    launcher(configs["small"], resumed_dir, device, f"train.max_steps={half}", f"checkpoint.every={half}")
    resumed = launcher(configs["small"], resumed_dir, device, *common, f"checkpoint.every={half}")
    if resumed:
        ok, worst = _losses_close(resumed, gpu, range(half + 1, steps + 1), 1e-5)
        report(ok, f"save at step {half} and resume on the device", f"steps {half + 1}-{steps}: worst loss rel "
               f"diff {worst:.2e} from the uninterrupted run (tol 1e-5)")


SPEED_VARIANTS = (
    # (name, overrides): the recipe as shipped (compile on, chunked loss), then one change each
    ("compile on, chunked loss", ("train.compile=true", "train.loss_chunk_tokens=1024")),
    ("compile off, chunked loss", ("train.compile=false", "train.loss_chunk_tokens=1024")),
    ("compile on, full fp32 logits", ("train.compile=true", "train.loss_chunk_tokens=0")),
)


def check_speed(configs: dict[str, Path], out: Path, device: str, steps: int, preset: str,
                variants: int = len(SPEED_VARIANTS)) -> None:
    """The 1.3B shape (bf16, ZeRO-1, micro batch 8 x 2048): tokens/s, MFU, peak memory and time
    to the first step over ``steps`` steps for the recipe as shipped (compile on, chunked loss)
    and with compile off and with the full fp32 logits (the first ``variants`` of
    :data:`SPEED_VARIANTS`), beside the --dry-run estimate."""
    dry = subprocess.run([sys.executable, str(ROOT / "launcher" / "pretrain.py"), "--config", str(configs["big"]),
                          "--dry-run", "--world-size", "1", f"model.preset={preset}"],
                         check=False, cwd=ROOT, capture_output=True, text=True)
    estimate = next((line.strip() for line in dry.stdout.splitlines() if "<- this plan" in line), "?")
    base: float | None = None
    for i, (name, overrides) in enumerate(SPEED_VARIANTS[:variants]):
        got = launcher(configs["big"], out / "runs" / f"speed{i}", device, f"train.max_steps={steps}",
                       f"model.preset={preset}", *overrides)
        if not got:
            continue
        late = [got[s] for s in sorted(got) if s > min(5, steps - 1)]
        tps = statistics.median(r["train/tokens_per_second"] for r in late)
        base = base or tps
        mfu = [r["train/mfu"] for r in late if "train/mfu" in r]
        memory = max(r["train/memory_gb"] for r in late)
        first = next((r["startup/seconds_to_first_step"] for r in got.values()
                      if "startup/seconds_to_first_step" in r), float("nan"))
        mfu_text = f"MFU {statistics.median(mfu) * 100:.1f}%" if mfu else "MFU not reported (unknown device)"
        report(all(math.isfinite(r["train/loss"]) for r in got.values()), f"{preset} shape, {name}",
               f"{tps:,.0f} tokens/s ({tps / base:.2f}x the first), {mfu_text}, peak {memory:.1f} GiB "
               f"allocated, {first:.0f} s to the first step (median of steps after the 5th)")
    report(None, f"{preset} shape --dry-run plan", estimate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["prepare", "model", "steps", "speed", "all"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the plumbing")
    parser.add_argument("--layers", type=int, default=2, help="model check: layers of the 1.3B shape")
    parser.add_argument("--seq", type=int, default=BIG_SEQ, help="model check: sequence length")
    parser.add_argument("--steps", type=int, default=16, help="steps check: launcher steps per run")
    parser.add_argument("--speed-steps", type=int, default=30, help="speed check: steps of the 1.3B shape")
    parser.add_argument("--speed-preset", default="1.3B", help="speed check: model preset (tiny for plumbing)")
    parser.add_argument("--speed-variants", type=int, default=len(SPEED_VARIANTS),
                        help="speed check: how many of compile on / compile off / full logits to run")
    args = parser.parse_args()
    if args.device != "cpu" and args.check != "prepare":  # preparing the data needs no GPU
        import torch

        if not torch.cuda.is_available():
            report(False, "CUDA", f"torch {torch.__version__} sees no GPU (install a CUDA build; see README)")
            return 1
        report(None, "device", f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    configs = prepare(args.out, big=args.check in ("speed", "all", "prepare"))
    if args.check in ("model", "all"):
        check_model(args.device, args.layers, args.seq)
        check_document_attention(args.device, args.layers, args.seq)
    if args.check in ("steps", "all"):
        check_steps(configs, args.out, args.device, args.steps)
    if args.check in ("speed", "all"):
        check_speed(configs, args.out, args.device, args.speed_steps, args.speed_preset, args.speed_variants)
    if FAILED:
        print(f"{len(FAILED)} check(s) failed: {', '.join(FAILED)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
