"""bench/gpu_check.sh: valid bash, and its CPU-only part (data, configs, the model check's
plumbing with the CPU standing in for the GPU) runs here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crucible.config import load_config
from tests.harness import ROOT, cpu_env
from training.config import PretrainConfig


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
def test_preparation_and_model_check_run_on_cpu(tmp_path):
    def check(*args: str) -> str:
        proc = subprocess.run([sys.executable, "bench/gpu_check.py", *args, "--out", str(tmp_path)],
                              cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    check("prepare")
    for name, seq in (("small", 256), ("big", 2048)):
        cfg = load_config(PretrainConfig, tmp_path / f"{name}.yaml")
        manifest = json.loads(Path(cfg.data.manifests[0]).read_text())
        assert manifest["seq_len"] == seq and manifest["tokenizer"]["vocab_size"] == 8000
    assert load_config(PretrainConfig, tmp_path / "big.yaml").model.preset == "1.3B"
    out = check("model", "--device", "cpu", "--layers", "1", "--seq", "64")
    assert "PASS same initial weights" in out and "PASS fp32 device vs CPU" in out and "FAIL" not in out
