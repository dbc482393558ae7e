"""The main job end to end: a reduced `make demo` (fewer steps) on the bundled sample."""

import json
import re
import subprocess
import sys

import pytest

from tests.harness import ROOT, cpu_env


@pytest.mark.slow
@pytest.mark.distributed
def test_reduced_demo_end_to_end(tmp_path):
    """30 pretraining steps (validation loss falls from its first evaluation, about 7.8 -> 7.0) and
    90 fine-tune steps (test accuracy 0.70 measured, the check asks majority + 0.10 = 0.62): the
    fine-tune's margin comes from its own steps, not from the pretraining's length."""
    run = tmp_path / "demo"
    cmd = [sys.executable, "launcher/demo.py", "--run-dir", str(run), "--pretrain-steps", "30",
           "--finetune-steps", "90", "--master-port", "29741"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=1500)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((run / "logs").glob("*.log"))) if (run / "logs").is_dir() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    # one progress line per stage, then the report
    stages = [line.split("]")[0].strip("[ ") for line in proc.stdout.splitlines() if line.startswith("[")]
    assert stages == ["clean", "tokenizer", "shards", "pretrain", "finetune", "export", "generate", "report"]

    stats = json.loads((run / "data/clean/stats.json").read_text())
    dropped = sum(stats["dropped"].values()) + len(stats["errors"])
    assert stats["documents_read"] == stats["documents_kept"] + dropped
    assert json.loads((run / "data/shards/manifest.json").read_text())["totals"]["train"]["samples"] > 500

    rows = [json.loads(x) for x in (run / "pretrain/metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) >= 2 and val[-1] < val[0], f"validation loss did not fall: {val}"

    test = json.loads((run / "finetune_sentiment/metrics.json").read_text())["test"]
    assert test["accuracy"] >= test["majority_rate"] + 0.10, test

    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["new_token_ids"] for s in samples)

    # the export loads in Hugging Face and generates
    check = (
        "import sys, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('The government said', return_tensors='pt', add_special_tokens=False).input_ids\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 8, out.shape\n"
        "print(t.decode(out[0]))\n"
    )
    hf = subprocess.run([sys.executable, "-c", check, str(run / "hf")], cwd=ROOT, env=cpu_env(),
                        capture_output=True, text=True, timeout=300)
    assert hf.returncode == 0, hf.stderr[-3000:]

    report = (run / "report.md").read_text()
    for part in ("Data funnel", "Tokenizer", "Pretraining", "tokens/s", "MFU", "Fine-tuning",
                 "accuracy", "Generated samples", "## Commands", "## Configs"):
        assert part in report, part
    for png in ("funnel.png", "pretrain_loss.png", "finetune_loss.png"):
        assert (run / png).stat().st_size > 5_000

    # launcher/report.py builds the same report for a chain of stage directories, noting what is absent
    chain = tmp_path / "chain" / "report.md"
    proc = subprocess.run([sys.executable, "launcher/report.py", str(run / "data/clean"), str(run / "data/shards"),
                           str(run / "pretrain"), str(run / "finetune_sentiment"), str(run / "finetune_other"),
                           "--out", str(chain)], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300,
                           check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = chain.read_text()
    for part in ("## Data funnel", "## Tokenizer", "## Token shards", "## Pretraining", "MFU", "## Fine-tuning",
                 "| test | accuracy |", "Contamination check", "finetune_other`: does not exist, skipped", "## Configs"):
        assert part in text, part
    for png in ("funnel.png", "pretrain_loss.png", "finetune_loss.png"):
        assert (chain.parent / png).stat().st_size > 5_000

    # the fine-tune's log lines carry the fine-tune's logger names, not the pretraining ones
    names = set(re.findall(r"\] [A-Z]+ (crucible[\w.]*):", (run / "finetune_sentiment/logs/rank0.log").read_text()))
    assert "crucible.training.task" in names, names
    assert not any("pretrain" in name or "language_model" in name for name in names), names

    # a second run reuses every completed stage
    again = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sum("reused" in line for line in again.stdout.splitlines()) == 7, again.stdout
