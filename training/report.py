"""The run report: Markdown with PNGs (also sent to TensorBoard as text) for any chain of stage
outputs: cleaning, tokenizer, token shards, pretraining, fine-tuning.

Each directory's kind is recognised by what its stage writes (:func:`detect_kind`); a folder
that holds stage outputs (``prepare_data``'s output, the demo's run directory) stands for the
stages inside it (:func:`expand`). A directory that does not exist or is of no known kind is
listed with a note and skipped. The report reads only what the stages wrote: the cleaning
``stats.json``, the tokenizer ``report.json``, the shard ``manifest.json``, the pretraining
``metrics.jsonl`` and ``deepspeed_config.json``, the fine-tune ``metrics.json``, generated
samples (``samples.jsonl``), and every stage's resolved ``config.yaml``.

``launcher/report.py`` builds it for any directories; ``launcher/demo.py`` for its run.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("clean", "tokenizer", "shards", "pretrain", "finetune")
"""Stage kinds in pipeline order (the order of the report's sections)."""

TITLES = {"clean": "Data funnel (documents and characters per filter and source)",
          "tokenizer": "Tokenizer", "shards": "Token shards", "pretrain": "Pretraining",
          "finetune": "Fine-tuning"}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.yaml"
    if not cfg.is_file():
        return {}
    try:
        return yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}


def detect_kind(path: Path) -> str | None:
    """The stage that wrote ``path`` (one of :data:`KINDS`), or None."""
    if not path.is_dir():
        return None
    if (path / "stats.json").is_file() and ((path / "_SUCCESS").is_file() or any(path.glob("docs-*.tar"))):
        return "clean"
    if (path / "manifest.json").is_file():
        return "shards"
    if (path / "tokenizer.model").is_file() and (path / "report.json").is_file():
        return "tokenizer"
    if (path / "lr_find.json").is_file():
        return None  # an LR range test: its lr_find.png is the report
    cfg = _read_config(path)
    if "task" in cfg or (path / "metrics.json").is_file():
        return "finetune"
    if (path / "metrics.jsonl").is_file() or (path / "deepspeed_config.json").is_file():
        return "pretrain"
    return None


@dataclass
class Inputs:
    """The stage directories found for a report, and notes about what was skipped."""

    stages: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)


def expand(paths: Sequence[str | Path]) -> Inputs:
    """Stage directories of ``paths`` in pipeline order. A path of no kind stands for the stage
    directories up to two levels below it (``prepare_data``'s output, the demo's run)."""
    found = Inputs()
    for given in map(Path, paths):
        if not given.exists():
            found.notes.append(f"`{given}`: does not exist, skipped")
            continue
        kind = detect_kind(given)
        if kind is not None:
            found.stages.append((kind, given))
            continue
        inner = []
        for child in sorted(p for p in given.iterdir() if p.is_dir()):
            child_kind = detect_kind(child)
            if child_kind is not None:
                inner.append((child_kind, child))
            else:
                inner += [(k, g) for g in sorted(p for p in child.iterdir() if p.is_dir())
                          if (k := detect_kind(g)) is not None]
        found.stages += inner
        if (given / "samples.jsonl").is_file():
            found.samples.append(given / "samples.jsonl")
        elif not inner:
            found.notes.append(f"`{given}`: not the output of clean, build_tokenizer, shard, pretrain or "
                               "finetune (and holds none), skipped")
    order = {k: i for i, k in enumerate(KINDS)}
    found.stages.sort(key=lambda item: order[item[0]])  # stable: the given order within a kind
    return found


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


class _Figures:
    """PNG names beside the report, one per figure kind: ``funnel.png``, then ``funnel_2.png``..."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.used = folder, set()

    def path(self, stem: str) -> Path:
        name, n = f"{stem}.png", 1
        while name in self.used:
            n += 1
            name = f"{stem}_{n}.png"
        self.used.add(name)
        return self.folder / name


def _link(png: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(png, report_dir)).as_posix()


def clean_section(clean: Path, figures: _Figures, report_dir: Path) -> list[str]:
    from data_pipeline.clean.report import plot_funnel, summary_table

    stats = _read_json(clean / "stats.json")
    png = plot_funnel(clean, figures.path("funnel"))
    dropped = sorted(stats.get("dropped", {}).items(), key=lambda kv: -kv[1])
    lines = [f"![data funnel]({_link(png, report_dir)})", "", "```", summary_table(stats), "```", "",
             "| dropped by | documents |", "| --- | ---: |"]
    lines += [f"| `{reason}` | {count} |" for reason, count in dropped]
    lines += ["", (f"Characters in: {stats['chars_in']:,}; out: {stats['chars_out']:,} "
                  f"({stats['chars_out'] / max(stats['chars_in'], 1):.1%}). Errors: {len(stats.get('errors', []))}.")]
    return lines


def tokenizer_section(tok: Path) -> list[str]:
    rep = _read_json(tok / "report.json")
    return [(f"- {rep['model_type']} sentencepiece, vocabulary {rep['vocab_size']}, trained on "
            f"{rep.get('training_documents', '?')} documents"),
            (f"- held-back documents: {rep['bytes_per_token']} bytes per token, "
            f"{rep['tokens_per_word']} tokens per word; Hugging Face tokenizer mismatches: "
            f"{rep.get('hf_mismatched_documents')}")]


def shards_tokenizer_dir(shards: Path) -> Path | None:
    """The tokenizer folder a shard set was written with: the manifest's path (absolute, or
    relative to the manifest), else a ``tokenizer`` folder beside the shards."""
    recorded = _read_json(shards / "manifest.json").get("tokenizer", {}).get("path")
    candidates = [Path(recorded) if Path(recorded).is_absolute() else shards / recorded] if recorded else []
    candidates.append(shards.parent / "tokenizer")
    found = next((c for c in candidates if (c / "report.json").is_file()), None)
    if found is not None and found.is_absolute():
        try:  # shown as the user's own paths are: relative to the working directory
            return found.relative_to(Path.cwd())
        except ValueError:
            return found
    return found


def shards_section(shards: Path) -> list[str]:
    m = _read_json(shards / "manifest.json")
    t = m["totals"]
    tail = sum(t[s].get("dropped_tail_tokens", 0) for s in ("train", "validation") if s in t)
    lines = [(f"- seq_len {m['seq_len']}, {m['dtype']}, vocabulary {m['tokenizer'].get('vocab_size')}; "
             f"train {t['train']['samples']:,} samples ({t['train']['tokens']:,} tokens) in "
             f"{len(m['splits'].get('train', []))} shard(s)")]
    if "validation" in t:
        lines[-1] += f", validation {t['validation']['samples']:,} samples"
    lines.append(f"- documents: {t.get('documents', '?')}; dropped tail tokens {tail:,}")
    return lines


def _world_size(ds: dict[str, Any]) -> int | None:
    try:
        return ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _training_title(run: Path, workload: str) -> str:
    cfg = _read_config(run)
    ds = _read_json(run / "deepspeed_config.json") if (run / "deepspeed_config.json").is_file() else {}
    parts = [workload]
    model = cfg.get("model", {}) or {}
    if model.get("preset"):
        parts.append(str(model["preset"]))
    task = cfg.get("task", {}) or {}
    if task.get("kind"):
        parts.append(str(task["kind"]))
    world = _world_size(ds)
    if world:
        parts.append(f"{world} rank{'s' if world > 1 else ''}")
    if ds.get("zero_optimization"):
        parts.append(f"ZeRO-{ds['zero_optimization'].get('stage', 0)}")
    return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


def pretrain_section(pre: Path, figures: _Figures, report_dir: Path) -> list[str]:
    rows = _read_jsonl(pre / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    if not train:
        return [f"_no training step recorded in `{pre / 'metrics.jsonl'}`_"]
    png = plot_losses(rows, figures.path("pretrain_loss"), _training_title(pre, "pretraining"))
    steady = [r for r in train if r["step"] > 3 and "train/tokens_per_second" in r] or train
    lines = [f"![pretraining loss]({_link(png, report_dir)})" if png else "", "",
             (f"- {_training_title(pre, 'pretraining')}: steps {train[-1]['step']}, samples consumed "
             f"{train[-1].get('consumed_samples', 0):,}")]
    if any("train/tokens_per_second" in r for r in steady):
        tps = statistics.median(r["train/tokens_per_second"] for r in steady if "train/tokens_per_second" in r)
        mfu = [r["train/mfu"] for r in steady if "train/mfu" in r]
        lines.append(f"- throughput: {tps:,.0f} tokens/s (median over steps)"
                     + (f", MFU {statistics.median(mfu):.1%} of the device peak (a measured GEMM peak on CPU)"
                        if mfu else ", MFU not reported (device peak unknown)"))
    lines.append(f"- final train loss {train[-1]['train/loss']:.3f}")
    val = [r for r in rows if "val/loss" in r]
    if val:
        lines.append(f"- validation loss {val[0]['val/loss']:.3f} (step {val[0]['step']}) -> "
                     f"{val[-1]['val/loss']:.3f} (step {val[-1]['step']}), perplexity "
                     f"{val[-1]['val/perplexity']:.1f}")
    return lines


def finetune_section(ft: Path, figures: _Figures, report_dir: Path) -> list[str]:
    rows = _read_jsonl(ft / "metrics.jsonl")
    png = plot_losses(rows, figures.path("finetune_loss"), _training_title(ft, "fine-tune"))
    lines = [f"![fine-tune loss]({_link(png, report_dir)})" if png else "", "",
             f"- {_training_title(ft, 'fine-tune')}"]
    metrics_file = ft / "metrics.json"
    if not metrics_file.is_file():
        return lines + ["", f"_`{metrics_file}` not written yet: the fine-tune has not finished_"]
    m = _read_json(metrics_file)
    lines += ["", "| split | metric | value |", "| --- | --- | ---: |"]
    for split in ("dev", "test"):
        for k, v in (m.get(split) or {}).items():
            lines.append(f"| {split} | {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {split} | {k} | {v} |")
    lines += ["", (f"Steps: {m.get('step')}. Examples: {m.get('examples')}. Contamination check (n-gram "
                  f"overlap with the pretraining shards): `{json.dumps(m.get('contamination'))}`")]
    return lines


def _section(kind: str, path: Path, figures: _Figures, report_dir: Path) -> list[str]:
    if kind == "clean":
        return clean_section(path, figures, report_dir)
    if kind == "tokenizer":
        return tokenizer_section(path)
    if kind == "shards":
        return shards_section(path)
    if kind == "pretrain":
        return pretrain_section(path, figures, report_dir)
    return finetune_section(path, figures, report_dir)


def write_report(paths: Sequence[str | Path], out: str | Path, commands: Sequence[str] = (),
                 timings: dict[str, float] | None = None, tensorboard: bool = True) -> Path:
    """Write the report of the stage directories in ``paths`` (see :func:`expand`) to ``out``
    (PNGs beside it) and, with ``tensorboard``, the same text to ``<out dir>/tensorboard_report``.
    A shard set's tokenizer is reported with it when not given itself. Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    found = expand(paths)
    stages = list(found.stages)
    given_tokenizers = {p.resolve() for k, p in stages if k == "tokenizer"}
    for kind, path in list(stages):
        if kind == "shards":
            tok = shards_tokenizer_dir(path)
            if tok is not None and tok.resolve() not in given_tokenizers:
                given_tokenizers.add(tok.resolve())
                stages.append(("tokenizer", tok))
    order = {k: i for i, k in enumerate(KINDS)}
    stages.sort(key=lambda item: order[item[0]])
    figures = _Figures(out.parent)
    md = ["# Crucible run report", ""]
    md += [f"- {kind}: `{path}`" for kind, path in stages]
    md += [f"- {note}" for note in found.notes]
    if not stages:
        md.append("- no stage output found")
    for kind in KINDS:
        of_kind = [p for k, p in stages if k == kind]
        for path in of_kind:
            title = TITLES[kind] + (f": `{path.name}`" if len(of_kind) > 1 or kind in ("pretrain", "finetune") else "")
            md += ["", f"## {title}", "", *_section(kind, path, figures, out.parent)]
    samples = [row for path in found.samples for row in _read_jsonl(path)]
    if samples:
        md += ["", "## Generated samples (temperature 0.8, top-p 0.95, seed 0; from the Hugging Face export)", ""]
        md += [f"- **{s['prompt']}**{s['completion']}" for s in samples]
    if timings:
        md += ["", "## Stage times (seconds; 0 = reused)", "", "| stage | seconds |", "| --- | ---: |"]
        md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    if commands:
        md += ["", "## Commands", "", "```bash", *commands, "```"]
    md += ["", "## Configs", ""]
    for kind, path in stages:
        for name in ("config.yaml", "deepspeed_config.json"):
            file = path / name
            if file.is_file():
                lang = "json" if file.suffix == ".json" else "yaml"
                md += [f"<details><summary>{kind}: {file}</summary>", "", f"```{lang}",
                       file.read_text(encoding="utf-8").rstrip(), "```", "</details>", ""]
    text = "\n".join(md) + "\n"
    out.write_text(text, encoding="utf-8")
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(out.parent / "tensorboard_report")) as writer:
                writer.add_text("run_report", text)
        except ImportError:  # tensorboard is a dependency; keep the Markdown report regardless
            pass
    return out


def write_run_report(run: str | Path, commands: list[str], timings: dict[str, float]) -> Path:
    """The demo's report: ``<run>/report.md`` over everything under the demo's run directory."""
    run = Path(run)
    return write_report([run], run / "report.md", commands=commands, timings=timings)
