"""The run report of a demo / end-to-end run directory: Markdown with PNGs, also sent to
TensorBoard as text.

Reads only what the stages wrote: the cleaning ``stats.json``, the tokenizer ``report.json``,
the shard ``manifest.json``, the pretraining ``metrics.jsonl``, the fine-tune ``metrics.json``,
the generated samples, and every stage's resolved ``config.yaml``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _funnel_section(clean: Path, run: Path) -> list[str]:
    stats_file = clean / "stats.json"
    if not stats_file.is_file():
        return ["_cleaning stage not run_"]
    from data_pipeline.clean.report import plot_funnel, summary_table

    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    png = plot_funnel(clean, run / "funnel.png")
    dropped = sorted(stats.get("dropped", {}).items(), key=lambda kv: -kv[1])
    lines = [f"![data funnel]({png.name})", "", "```", summary_table(stats), "```", "",
             "| dropped by | documents |", "| --- | ---: |"]
    lines += [f"| `{reason}` | {count} |" for reason, count in dropped]
    lines += ["", f"Characters in: {stats['chars_in']:,}; out: {stats['chars_out']:,} "
                  f"({stats['chars_out'] / max(stats['chars_in'], 1):.1%}). Errors: {len(stats.get('errors', []))}."]
    return lines


def _tokenizer_section(data: Path) -> list[str]:
    rep_file, manifest_file = data / "tokenizer" / "report.json", data / "shards" / "manifest.json"
    if not rep_file.is_file():
        return ["_tokenizer stage not run_"]
    rep = json.loads(rep_file.read_text())
    lines = [f"- {rep['model_type']} sentencepiece, vocabulary {rep['vocab_size']}, trained on "
             f"{rep.get('training_documents', '?')} documents",
             f"- held-back documents: {rep['bytes_per_token']} bytes per token, "
             f"{rep['tokens_per_word']} tokens per word; Hugging Face tokenizer mismatches: "
             f"{rep.get('hf_mismatched_documents')}"]
    if manifest_file.is_file():
        m = json.loads(manifest_file.read_text())
        t = m["totals"]
        lines.append(f"- token shards: seq_len {m['seq_len']}, {m['dtype']}; train {t['train']['samples']} "
                     f"samples ({t['train']['tokens']:,} tokens), validation {t['validation']['samples']} "
                     f"samples; dropped tail tokens {t['train']['dropped_tail_tokens'] + t['validation']['dropped_tail_tokens']}")
    return lines


def _pretrain_section(pre: Path, run: Path) -> list[str]:
    rows = _read_jsonl(pre / "metrics.jsonl")
    if not rows:
        return ["_pretraining stage not run_"]
    png = plot_losses(rows, run / "pretrain_loss.png", "pretraining (cpu-small, 2 ranks, ZeRO-2)")
    steady = [r for r in rows if r["step"] > 3 and "train/tokens_per_second" in r] or rows
    tps = statistics.median(r["train/tokens_per_second"] for r in steady)
    mfu = statistics.median(r["train/mfu"] for r in steady)
    val = [r for r in rows if "val/loss" in r]
    lines = [f"![pretraining loss]({png.name})" if png else "", "",
             f"- steps: {rows[-1]['step']}, samples consumed: {rows[-1].get('consumed_samples', 0)}",
             f"- throughput: {tps:,.0f} tokens/s (median over steps), MFU {mfu:.1%} of the measured "
             f"CPU GEMM peak",
             f"- final train loss {rows[-1]['train/loss']:.3f}"]
    if val:
        lines.append(f"- validation loss {val[0]['val/loss']:.3f} (step {val[0]['step']}) -> "
                     f"{val[-1]['val/loss']:.3f} (step {val[-1]['step']}), perplexity "
                     f"{val[-1]['val/perplexity']:.1f}")
    return lines


def _finetune_section(ft: Path, run: Path) -> list[str]:
    metrics_file = ft / "metrics.json"
    if not metrics_file.is_file():
        return ["_fine-tune stage not run_"]
    m = json.loads(metrics_file.read_text())
    rows = _read_jsonl(ft / "metrics.jsonl")
    png = plot_losses(rows, run / "finetune_loss.png", "sentiment fine-tune")
    lines = [f"![fine-tune loss]({png.name})" if png else "", "", "| split | metric | value |",
             "| --- | --- | ---: |"]
    for split in ("dev", "test"):
        for k, v in m.get(split, {}).items():
            lines.append(f"| {split} | {k} | {v:.4f} |")
    lines += ["", f"Examples: {m.get('examples')}. Contamination check (13-gram overlap with the "
                  f"pretraining shards): `{json.dumps(m.get('contamination'))}`"]
    return lines


def write_run_report(run: str | Path, commands: list[str], timings: dict[str, float]) -> Path:
    """Write ``<run>/report.md`` (+ PNGs) and the same text to TensorBoard; returns the path."""
    run = Path(run)
    data, pre, ft = run / "data", run / "pretrain", run / "finetune_sentiment"
    samples = _read_jsonl(run / "samples.jsonl")
    md = ["# Crucible run report", "", f"Run directory: `{run}`", "",
          "## Data funnel (documents and characters per filter and source)", "",
          *_funnel_section(data / "clean", run), "",
          "## Tokenizer", "", *_tokenizer_section(data), "",
          "## Pretraining", "", *_pretrain_section(pre, run), "",
          "## Fine-tuning: sentiment (UCI sentences)", "", *_finetune_section(ft, run), "",
          "## Generated samples (temperature 0.8, top-p 0.95, seed 0; from the Hugging Face export)", ""]
    for s in samples:
        md.append(f"- **{s['prompt']}**{s['completion']}")
    md += ["", "## Stage times (seconds; 0 = reused)", "", "| stage | seconds |", "| --- | ---: |"]
    md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    md += ["", "## Commands", "", "```bash", *commands, "```", "", "## Configs", ""]
    for name, path in (("clean", data / "clean" / "config.yaml"), ("tokenizer", data / "tokenizer" / "config.yaml"),
                       ("pretrain", pre / "config.yaml"), ("pretrain DeepSpeed", pre / "deepspeed_config.json"),
                       ("finetune", ft / "config.yaml")):
        if path.is_file():
            lang = "json" if path.suffix == ".json" else "yaml"
            md += [f"<details><summary>{name}: {path.relative_to(run)}</summary>", "", f"```{lang}",
                   path.read_text(encoding="utf-8").rstrip(), "```", "</details>", ""]
    text = "\n".join(md) + "\n"
    out = run / "report.md"
    out.write_text(text, encoding="utf-8")
    try:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run / "tensorboard_report")) as writer:
            writer.add_text("run_report", text)
    except ImportError:  # tensorboard is a dependency; keep the Markdown report regardless
        pass
    return out
