"""Human-readable views of a cleaning run's ``stats.json``: a summary table and a funnel plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.clean.filters.chain import FUNNEL_STAGES
from data_pipeline.clean.output import STATS_FILE


def summary_table(stats: dict[str, Any]) -> str:
    """Per-source table: read, kept, dropped, errors, characters in/out."""
    header = f"{'source':<12}{'read':>10}{'kept':>10}{'kept%':>8}{'dropped':>10}{'errors':>9}{'chars in':>14}{'chars out':>14}"
    rows = [header, "-" * len(header)]
    parts = list(stats["per_source"].items()) + [("TOTAL", {
        "read": stats["documents_read"], "kept": stats["documents_kept"], "dropped": stats["dropped"],
        "errors": stats["errors"], "chars_in": stats["chars_in"], "chars_out": stats["chars_out"]})]
    for name, s in parts:
        pct = 100.0 * s["kept"] / s["read"] if s["read"] else 0.0
        rows.append(f"{name:<12}{s['read']:>10}{s['kept']:>10}{pct:>7.1f}%{sum(s['dropped'].values()):>10}"
                    f"{sum(s['errors'].values()):>9}{s['chars_in']:>14}{s['chars_out']:>14}")
    reasons = sorted(stats["dropped"].items(), key=lambda kv: -kv[1])
    if reasons:
        rows.append("dropped by reason: " + ", ".join(f"{k} {v}" for k, v in reasons))
    if stats["errors"]:
        rows.append("errors by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["errors"].items())))
    return "\n".join(rows)


def funnel(source_stats: dict[str, Any]) -> list[tuple[str, int]]:
    """(stage, documents remaining after it) in pipeline order, starting from documents read."""
    remaining = source_stats["read"]
    steps = [("read", remaining)]
    removed_by_stage: dict[str, int] = {}
    if source_stats["errors"]:
        removed_by_stage["error"] = sum(source_stats["errors"].values())
    for reason, n in source_stats["dropped"].items():
        stage = reason.split(".", 1)[0]
        removed_by_stage[stage] = removed_by_stage.get(stage, 0) + n
    for stage in FUNNEL_STAGES:
        if stage in removed_by_stage:
            remaining -= removed_by_stage[stage]
            steps.append((stage, remaining))
    return steps


def plot_funnel(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw the filter funnel of every source of a cleaning run as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    stats = json.loads((run_dir / STATS_FILE).read_text(encoding="utf-8"))
    sources = stats["per_source"]
    fig, axes = plt.subplots(len(sources), 1, figsize=(9, 2.6 * max(len(sources), 1)), squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], sources.items()):
        steps = funnel(s)
        labels = [k for k, _ in steps]
        values = [v for _, v in steps]
        ax.barh(range(len(steps)), values, color="#4477aa")
        ax.set_yticks(range(len(steps)), labels)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            pct = 100.0 * v / values[0] if values[0] else 0.0
            ax.text(v, i, f" {v} ({pct:.0f}%)", va="center", fontsize=8)
        ax.set_title(f"source {name}: documents remaining after each stage")
        ax.set_xlim(0, max(values[0], 1) * 1.25)
    fig.tight_layout()
    out_png = Path(out_png) if out_png else run_dir / "funnel.png"
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
