"""The fine-tune stage: batch order and resume, a 2-rank ZeRO-2 run through the deepspeed
launcher, prediction, bad-data errors (the NER and QA recipes run in tests/test_recipes.py)."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from crucible.errors import DataError
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
            "checkpoint.every=3"]
    # a 2-step smoke run: the recipe's 10 warm-up steps are longer than the run, which warns
    # naming where each value came from, and trains
    run_deepspeed(FINETUNE, args + ["train.max_steps=2"], num_gpus=2, timeout=600,
                  log_dir=tmp_path / "logs1").check()
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["step"] == 2
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert ("schedule.warmup_steps=10 (from configs/finetune/uci_sentiment.yaml) >= train.max_steps=2 "
            "(from the command line): the whole run is warm-up") in log
    assert "training labels (data/sample/finetune/uci_sentiment/imdb_labelled.txt" in log
    assert "training labels that may be typos" not in log
    result = run_deepspeed(FINETUNE, args + ["train.max_steps=6"], num_gpus=2, timeout=600,
                           log_dir=tmp_path / "logs2").check()
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "resumed from" in log and "step 2" in log, result.describe()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "majority_rate"}
    assert metrics["examples"]["test"] > 250
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and 4 in steps
    model_dir = json.loads((run_dir / "latest.json").read_text())["model_dir"]
    task = json.loads(Path(run_dir, model_dir, "task.json").read_text())  # relative to the run
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


def test_init_from_a_folder_that_is_no_model_says_so(tiny_model_dir, tmp_path):
    """Not "install sentencepiece": the folder is named, what it holds, and what init_from takes."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model\n")
    proc = _python(["launcher/finetune.py", "--config", "configs/finetune/uci_sentiment.yaml",
                    f"init_from={notes}", f"run_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"init_from={notes} is not a model: it holds no model files (readme.txt)" in proc.stderr
    assert "a model directory (model_config.json, model.safetensors and tokenizer files" in proc.stderr
    assert "sentencepiece" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was set up

    from training.tasks.features import find_init_model

    tokenizer_only = tmp_path / "tokenizer"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.model").write_bytes((tiny_model_dir / "tokenizer.model").read_bytes())
    with pytest.raises(DataError, match=r"is not a model: it is a tokenizer folder \(launcher/build_tokenizer.py\)"):
        find_init_model(tokenizer_only)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a model: the folder is empty"):
        find_init_model(tmp_path / "empty")
    assert find_init_model(tiny_model_dir) == tiny_model_dir


def test_missing_init_from_is_a_config_error(tmp_path):
    proc = _python(["launcher/finetune.py", "--config", "configs/finetune/uci_sentiment.yaml",
                    f"run_dir={tmp_path}"])
    assert proc.returncode == 2 and "init_from is not set" in proc.stderr


# ------------------------------------------------------------------ prediction inputs

@pytest.fixture(scope="module")
def task_dirs(tiny_model_dir, tmp_path_factory):
    """A task model directory per kind on the tiny backbone (random heads: only the plumbing
    from input lines to output lines is under test)."""
    from model.heads import build_head
    from model.io import load_model_dir
    from model.task_io import save_task_dir

    out = tmp_path_factory.mktemp("task_dirs")
    labels = {"classification": ["neg", "pos"], "token_classification": ["O", "B-LOC", "I-LOC"], "qa": []}
    formats = {"classification": "tsv", "token_classification": "conll", "qa": "squad"}
    for kind, names in labels.items():
        torch.manual_seed(0)
        backbone, cfg = load_model_dir(tiny_model_dir)
        head = build_head(kind, backbone, len(names) or 1, 3)
        record = {"kind": kind, "labels": names, "problem_type": "single_label", "pad_id": 3, "eos_id": 2,
                  "bos_id": 1, "max_length": 64, "doc_stride": 16, "max_answer_length": 30, "n_best": 20,
                  "format": formats[kind], "text_column": "text", "text_pair_column": None,
                  "label_column": "label", "columns": ["text", "label"] if kind == "classification" else None}
        save_task_dir(out / kind, head.state_dict(), cfg, record, tokenizer_dir=tiny_model_dir)
    return out


TEXTS = ["A wonderful, moving film.", "The food was cold and the staff rude.", "Fine."]


@pytest.mark.parametrize("name,content", [
    ("only_text.csv", "text\n" + "\n".join(f'"{t}"' for t in TEXTS) + "\n"),
    ("only_text.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS)),
    ("only_text.tsv", "text\n" + "\n".join(TEXTS) + "\n"),
    ("recipe_columns.tsv", "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXTS))),  # task.columns, labelled
    ("recipe_columns_unlabelled.tsv", "\n".join(TEXTS) + "\n"),  # task.columns without the label column
])
def test_predict_reads_a_text_only_table(name, content, task_dirs, tmp_path):
    """The normal prediction input, a file with only a text column, gives one prediction per row
    (it crashed with "New column name text already in the dataset")."""
    from training.tasks.predict import predict

    path = tmp_path / name
    path.write_text(content)
    results = predict(task_dirs / "classification", path)
    assert [r["text"] for r in results] == TEXTS
    assert all(r["prediction"] in ("neg", "pos") and 0.5 <= r["probability"] <= 1 for r in results)


def test_predict_keeps_one_output_per_input_line(task_dirs, tmp_path, capsys):
    """Blank lines keep their places (marked empty, no label guessed), so output line k answers
    input line k; through the launcher's entry function."""
    from launcher.predict import main

    lines = [TEXTS[0], "", "   ", TEXTS[1], "", TEXTS[2]]
    path = tmp_path / "reviews.txt"
    path.write_text("\r\n".join(lines) + "\r\n")  # Windows line ends too
    assert main(["--model", str(task_dirs / "classification"), "--input", str(path)]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in out] == [line.strip() for line in lines]
    assert [r.get("empty", False) for r in out] == [not line.strip() for line in lines]
    assert all(r["prediction"] is None for r in out if r.get("empty"))
    assert all(r["prediction"] in ("neg", "pos") for r in out if not r.get("empty"))

    table = tmp_path / "gaps.csv"  # a blank row of a table keeps its place too
    table.write_text(f'text,label\n"{TEXTS[0]}",x\n\n{TEXTS[1]},y\n')
    out_file = tmp_path / "preds.jsonl"
    assert main(["--model", str(task_dirs / "classification"), "--input", str(table), "--output", str(out_file)]) == 0
    rows = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [r["text"] for r in rows] == [TEXTS[0], "", TEXTS[1]] and rows[1]["empty"] is True


def test_predict_ner_and_qa_inputs(task_dirs, tmp_path):
    from training.tasks.predict import predict

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Paris is nice\n\nI met John Smith\n")
    ner = predict(task_dirs / "token_classification", sentences)
    assert [r["tokens"] for r in ner] == [["Paris", "is", "nice"], [], ["I", "met", "John", "Smith"]]
    assert ner[1] == {"tokens": [], "prediction": None, "empty": True}
    assert [len(r["prediction"]) for r in (ner[0], ner[2])] == [3, 4]
    assert {t for r in (ner[0], ner[2]) for t in r["prediction"]} <= {"O", "B-LOC", "I-LOC"}

    questions = tmp_path / "questions.jsonl"  # no ids, no answers
    questions.write_text(json.dumps({"question": "What is the capital?", "context": "Paris is the capital of France."})
                         + "\n" + json.dumps({"question": "Who?", "context": ""}) + "\n")
    answers = predict(task_dirs / "qa", questions)
    assert [r["id"] for r in answers] == ["0", "1"]
    assert answers[0]["prediction"] in "Paris is the capital of France." and "empty" not in answers[0]
    assert answers[1] == {"id": "1", "question": "Who?", "prediction": None, "empty": True}
    with pytest.raises(DataError, match="a qa model cannot read plain text"):
        predict(task_dirs / "qa", sentences)
