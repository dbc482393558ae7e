"""Downstream evaluation with lm-evaluation-harness: our ``LM`` wrapper scores and generates as
the harness's own Hugging Face backend does on the exported model, the launcher's results and
errors, and the in-loop callback's scalars. Everything runs offline on the bundled tasks
(data/sample/eval)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.harness import run_on_ranks

TASKS = ["crucible_sentiment", "crucible_udhr_completion"]
ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """No test here may reach the network (the bundled tasks' data ship with the repository)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory) -> Path:
    """A tiny random model whose logits differ clearly between tokens (init_std 0.1, as
    tests/test_hf.py uses), so that greedy choices are not near-ties decided by rounding."""
    from model.config import ModelConfig
    from model.io import save_model_dir
    from model.transformer import Transformer
    from tests.datasets import shared_token_dataset

    tok_dir = shared_token_dataset(tmp_path_factory).parent.parent / "tokenizer"
    out = tmp_path_factory.mktemp("harness") / "model"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      init_std=0.1)
    save_model_dir(out, Transformer(cfg).state_dict(), cfg, tokenizer_dir=tok_dir)
    return out


def _evaluate(lm, tasks=TASKS):
    from training.harness_eval import evaluate_tasks

    return evaluate_tasks(lm, tasks, log_samples=True, bootstrap_iters=0)


def test_wrapper_equals_the_harness_hf_backend_on_the_exported_model(peaked_model_dir, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from model.convert import export_hf
    from training.harness_eval import scalar_metrics
    from training.harness_lm import CrucibleLM

    export_hf(peaked_model_dir, tmp_path / "hf")
    ours = CrucibleLM.from_model_dir(str(peaked_model_dir), batch_size=5)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=5, dtype="float32",
                  prefix_token_id=ours.prefix_token_id)
    # One decoder for the generated text: the random model emits byte-fallback pieces that are
    # not valid UTF-8, which sentencepiece and HF tokenizers render differently (U+FFFD for every
    # byte of a bad run vs for the bad bytes only), the tokenizer libraries' business, not the
    # wrapper's. Encoding, and the EOS text HFLM adds to the stop sequences, stay HF's own.
    hf_decode = theirs.tok_decode
    theirs.tok_decode = lambda tokens, skip_special_tokens=True: (
        ours.tok_decode(tokens) if skip_special_tokens else hf_decode(tokens, skip_special_tokens))
    got, want = _evaluate(ours), _evaluate(theirs)

    # multiple choice: every (context, choice) log-likelihood and greedy flag. Tolerance: the
    # two models' logits agree within 1e-5 (tests/test_hf.py); a log-softmax moves at most twice
    # that per token, and a choice has at most 3 tokens here: 6e-5 < 1e-4.
    mine, ref = got["samples"]["crucible_sentiment"], want["samples"]["crucible_sentiment"]
    assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in ref] and len(mine) == 16
    lls = [[float(r[0][0]) for r in s["resps"]] for s in mine]
    ref_lls = [[float(r[0][0]) for r in s["resps"]] for s in ref]
    torch.testing.assert_close(torch.tensor(lls, dtype=torch.float64),
                               torch.tensor(ref_lls, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    assert [[r[0][1] for r in s["resps"]] for s in mine] == [[r[0][1] for r in s["resps"]] for s in ref]
    # generation with stop sequences: the same greedy texts, cut at the same place
    texts = [s["resps"][0][0] for s in got["samples"]["crucible_udhr_completion"]]
    assert texts == [s["resps"][0][0] for s in want["samples"]["crucible_udhr_completion"]]
    assert any(texts) and not any(stop in t for t in texts for stop in ("\n", ".", ",", ";"))
    # stop sequences the random model's text does hold: each row cut where HFLM cuts it
    prompts = [f"{d['article']} of the Universal Declaration of Human Rights: {d['prefix']}"
               for d in (s["doc"] for s in got["samples"]["crucible_udhr_completion"])]
    gen = {"until": ["a", "e"], "max_gen_toks": 16, "do_sample": False}
    stopped = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen)), idx=0)
               for p in prompts]
    cut = ours.generate_until(stopped)
    assert cut == theirs.generate_until(stopped)
    assert all(t.startswith(c) for t, c in zip(texts, cut)) and sum(map(len, cut)) < sum(map(len, texts))
    # the same metrics
    metrics = scalar_metrics(got)
    assert {f"eval/{t}/{m}" for t in TASKS for m in ("acc", "acc_norm", "exact_match_strip")} & set(metrics)
    assert metrics == scalar_metrics(want)

    # rolling log-likelihood (perplexity tasks) over a text longer than the context (128)
    text = (ROOT / "data/sample/lang/udhr/eng.txt").read_text(encoding="utf-8")[:2000]
    request = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    assert len(ours.tok_encode(text)) > 2 * ours.max_length
    torch.testing.assert_close(torch.tensor(ours.loglikelihood_rolling(request), dtype=torch.float64),
                               torch.tensor(theirs.loglikelihood_rolling(request), dtype=torch.float64),
                               atol=1e-3, rtol=1e-5)  # ~600 tokens x 1e-5 x 2 (as above)


def test_generate_stops_a_row_when_the_stop_callback_says_so(peaked_model_dir):
    from model.generate import SamplingConfig, generate
    from model.io import load_model_dir

    model, _ = load_model_dir(peaked_model_dir)
    prompts = [[2, 40, 41, 42], [2, 50]]
    sampling = SamplingConfig(max_new_tokens=8, eos_id=None)
    full = generate(model.eval(), prompts, sampling)
    cut = generate(model, prompts, sampling, stop=lambda row, ids: row == 0 and len(ids) == 3)
    assert len(full[0]) == 8 and cut[0] == full[0][:3] and cut[1] == full[1]


def test_evaluate_launcher_writes_results_and_scalars(peaked_model_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launcher.evaluate import main

    out = tmp_path / "eval"
    assert main(["--model", str(peaked_model_dir), "--tasks", "crucible_sentiment", "--limit", "4",
                 "--output", str(out), "--step", "7"]) == 0
    results = json.loads((out / "results.json").read_text())
    acc = results["results"]["crucible_sentiment"]["acc,none"]
    assert results["n-samples"]["crucible_sentiment"]["effective"] == 4
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    [scalar] = events.Scalars("eval/crucible_sentiment/acc")
    assert scalar.step == 7 and scalar.value == pytest.approx(acc)
    assert "crucible_sentiment" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "--tasks", "crucible_sentiment"], "does not exist"),
    (["--model", "{model}", "--tasks", "crucible_sentimnet"], "unknown lm-evaluation-harness task"),
    (["--model", "{model}", "--tasks", "crucible_sentiment", "--include-path", "{missing}"],
     "is not a directory"),
    (["--model", "{model}", "--tasks", "crucible_sentiment", "--limit", "0"], "--limit must be"),
])
def test_evaluate_launcher_user_errors_are_one_line(peaked_model_dir, tmp_path, capsys, args, message):
    from launcher.evaluate import main

    filled = [a.format(missing=tmp_path / "nope", model=peaked_model_dir) for a in args]
    assert main([*filled, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_harness_tasks_under_zero3_are_refused():
    from crucible.config import load_config
    from crucible.errors import ConfigError
    from training.config import PretrainConfig

    with pytest.raises(ConfigError, match="harness.tasks needs train.zero_stage 0, 1 or 2"):
        load_config(PretrainConfig, None, ["harness.tasks=[crucible_sentiment]", "train.zero_stage=3"])


def _pretrain_with_harness(rank: int, world_size: int, run_dir: str, manifest: str) -> int:
    from crucible.config import load_config
    from training.config import PretrainConfig
    from training.pretrain import pretrain

    os.environ.update(OFFLINE)
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/cpu_tiny.yaml", [
        f"run_dir={run_dir}", f"data.manifests=[{manifest}]", "train.max_steps=3",
        "train.micro_batch_size=2", "train.zero_stage=0", "train.eval_every=0", "train.eval_batches=1",
        "checkpoint.every=0", "checkpoint.write_model_dir=never", "log.every=1",
        "harness.tasks=[crucible_sentiment]", "harness.every=2", "harness.limit=4"])
    return pretrain(cfg)


def test_in_loop_harness_callback_writes_eval_scalars(tmp_path, tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.datasets import shared_token_dataset

    manifest = shared_token_dataset(tmp_path_factory)
    run_dir = tmp_path / "run"
    assert run_on_ranks(_pretrain_with_harness, 1, str(run_dir), str(manifest), timeout=300) == [0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/crucible_sentiment/acc" in r}
    assert sorted(evals) == [2, 3]  # every 2 steps, and after the last step
    for step, record in evals.items():
        assert 0 <= record["eval/crucible_sentiment/acc"] <= 1 and record["eval/harness_seconds"] > 0
        saved = json.loads((run_dir / "eval" / f"step_{step:08d}" / "results.json").read_text())
        assert saved["results"]["crucible_sentiment"]["acc,none"] == record["eval/crucible_sentiment/acc"]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]  # training went on
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("eval/crucible_sentiment/acc")] == [2, 3]
