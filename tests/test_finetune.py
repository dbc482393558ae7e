"""The fine-tune stage: batch order and resume, a 2-rank ZeRO-2 run through the deepspeed
launcher, prediction, bad-data errors (the NER and QA recipes run in tests/test_recipes.py)."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from tests.harness import ROOT, cpu_env, run_deepspeed
from training.tasks.batches import TaskBatches
from training.tasks.classification import ClassificationTask
from training.tasks.config import TaskConfig

FINETUNE = ROOT / "launcher" / "finetune.py"
CLASSIFY = ClassificationTask(TaskConfig())


def _features(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[i + 10] * (1 + i % 5) for i in range(n)],
                                       "target": [[float(i % 2)] for i in range(n)]})


def _take(batches, k):
    it = iter(batches)
    return [next(it) for _ in range(k)]


def test_task_batches_order_resume_and_rank_shares():
    feats = _features(50)
    ref = TaskBatches(feats, CLASSIFY, 4, 2, 0, 1, seed=7, pad_id=3)
    first = _take(ref, 6)
    again = _take(TaskBatches(feats, CLASSIFY, 4, 2, 0, 1, seed=7, pad_id=3), 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    other_seed = _take(TaskBatches(feats, CLASSIFY, 4, 2, 0, 1, seed=8, pad_id=3), 1)
    assert not torch.equal(first[0][0], other_seed[0][0])

    # state after 2 optimizer steps (4 micro batches) resumes with the very next batches
    loader = TaskBatches(feats, CLASSIFY, 4, 2, 0, 1, seed=7, pad_id=3)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "position": 16}
    resumed = TaskBatches(feats, CLASSIFY, 4, 2, 0, 1, seed=7, pad_id=3)
    resumed.load_state_dict(state)
    for (a, _), (b, _) in zip(first[4:], _take(resumed, 2)):
        assert torch.equal(a, b)

    # 2 ranks with micro 2 x accum 2 share each global batch of 8 with no overlap
    ranks = [TaskBatches(feats, CLASSIFY, 2, 2, r, 2, seed=7, pad_id=3) for r in range(2)]
    seen = [torch.cat([t[:, 0] for t, _ in _take(rk, 2)]).tolist() for rk in ranks]
    single = torch.cat([t[:, 0] for t, _ in first[:2]]).tolist()
    assert sorted(seen[0] + seen[1]) == sorted(single)
    assert not set(seen[0]) & set(seen[1])


def test_task_batches_padding_and_epoch_rollover():
    feats = _features(10)
    loader = TaskBatches(feats, CLASSIFY, 4, 1, 0, 1, seed=0, pad_id=3)
    batches = _take(loader, 3)  # 10 examples: 2 full batches, then the next epoch
    assert loader.state_dict()["epoch"] == 1
    tokens, target = batches[0]
    assert tokens.shape[0] == 4 and target.shape == (4, 1)
    lengths = (tokens != 3).sum(1)
    assert tokens.shape[1] == int(lengths.max())


def _python(args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=cpu_env(), capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero2_finetune_resume_and_predict(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "configs/finetune/uci_sentiment.yaml", f"init_from={tiny_model_dir}",
            f"run_dir={run_dir}", "train.micro_batch_size=8", "train.eval_every=3",
            "checkpoint.every=3", "schedule.warmup_steps=1"]
    run_deepspeed(FINETUNE, args + ["train.max_steps=3"], num_gpus=2, timeout=600,
                  log_dir=tmp_path / "logs1").check()
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["step"] == 3
    result = run_deepspeed(FINETUNE, args + ["train.max_steps=6"], num_gpus=2, timeout=600,
                           log_dir=tmp_path / "logs2").check()
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "resumed from" in log and "step 3" in log, result.describe()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "majority_rate"}
    assert metrics["examples"]["test"] > 250
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and 4 in steps
    model_dir = json.loads((run_dir / "latest.json").read_text())["model_dir"]
    task = json.loads((Path(model_dir) / "task.json").read_text())
    assert task["kind"] == "classification" and task["labels"] == ["0", "1"]
    preds = [json.loads(x) for x in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["examples"]["test"] and {p["prediction"] for p in preds} <= {"0", "1"}

    inputs = tmp_path / "in.txt"
    inputs.write_text("A wonderful, moving film.\nThe food was cold and the staff rude.\n")
    proc = _python(["launcher/predict.py", "--model", run_dir, "--input", inputs])
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["text"] for x in lines] == inputs.read_text().splitlines()
    assert all(x["prediction"] in ("0", "1") and 0.5 <= x["probability"] <= 1 for x in lines)


@pytest.mark.parametrize("override,needle", [
    ("task.text_column=sentence", "column(s) ['sentence'] not found"),
    ("task.train=nope.tsv", "task.train file nope.tsv does not exist"),
])
def test_bad_data_exits_2_with_clear_message(override, needle, tiny_model_dir, tmp_path):
    proc = _python(["launcher/finetune.py", "--config", "configs/finetune/uci_sentiment.yaml",
                    f"init_from={tiny_model_dir}", f"run_dir={tmp_path}", override])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_missing_init_from_is_a_config_error(tmp_path):
    proc = _python(["launcher/finetune.py", "--config", "configs/finetune/uci_sentiment.yaml",
                    f"run_dir={tmp_path}"])
    assert proc.returncode == 2 and "init_from is not set" in proc.stderr
