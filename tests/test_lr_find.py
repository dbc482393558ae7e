"""LR range test: the suggestion rule on synthetic curves, and a short real sweep."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.harness import ROOT, cpu_env
from training.lr_find import suggest_lr


def test_suggestion_is_a_tenth_of_the_minimum_before_divergence():
    lrs = list(np.logspace(-6, 0, 61))
    x = np.log10(lrs)
    losses = list(2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1.5, (x + 1.5) * 20, 0))
    result = suggest_lr(lrs, losses, smoothing=0.0)
    i_min = int(np.argmin(losses))
    assert result["min_loss_lr"] == pytest.approx(lrs[i_min])
    assert result["suggested_lr"] == pytest.approx(lrs[i_min] / 10)
    assert 1e-4 < result["steepest_lr"] < 1e-2  # the sigmoid's steepest point is at 1e-3
    assert result["cutoff"] < len(lrs)


@pytest.mark.slow
def test_lr_find_writes_plot_and_suggestion(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir
    proc = subprocess.run(
        [sys.executable, "launcher/lr_find.py", "--config", "configs/finetune/uci_sentiment.yaml",
         f"init_from={model_dir}", f"run_dir={tmp_path}", "--steps", "12", "train.zero_stage=1",
         "train.micro_batch_size=8"],
        cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    assert len(record["lrs"]) == 12 and record["lrs"] == sorted(record["lrs"])
    assert record["lrs"][0] == pytest.approx(1e-6) and record["lrs"][-1] == pytest.approx(1.0)
    assert record["suggested_lr"] == pytest.approx(record["min_loss_lr"] / 10)
    assert (tmp_path / "lr_find" / "lr_find.png").stat().st_size > 10_000
    assert "suggested learning rate" in proc.stdout
