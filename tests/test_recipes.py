"""Every shipped recipe runs as written, shrunk only where size forces it: a tiny model, a few
steps, 2 CPU ranks, the bundled data, and a global batch of two accumulated micro batches per
rank. Everything else is the recipe's own: ZeRO stage, precision (bf16 runs DeepSpeed's bf16
path on CPU), offload, activation checkpointing, optimizer implementation, data mix and
workers, task format and columns.

Recipes run elsewhere in the suite are listed in ``COVERED`` (a test fails when a recipe is in
neither place). bf16 is compared with fp32 and optimizer offload with no offload on the same
data and seed.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT, run_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PRETRAIN = ROOT / "launcher" / "pretrain.py"
FINETUNE = ROOT / "launcher" / "finetune.py"
STEPS = 4
# recipes run as written by other tests (2 ranks, their own settings)
COVERED = {
    "pretrain/cpu_tiny.yaml": "tests/test_pretrain_distributed.py (every run)",
    "pretrain/cpu_demo.yaml": "tests/test_demo.py (the reduced demo)",
    "pretrain/cpu_continue.yaml": "tests/test_pretrain_init_from.py (continued from another run, then resumed)",
    "pretrain/cpu_anneal.yaml": "tests/test_data_phases.py::test_two_phase_run_switches_and_resumes_bit_for_bit_after_sigkill",
    "finetune/uci_sentiment.yaml": "tests/test_finetune.py::test_two_rank_zero2_finetune_resume_and_predict",
}
# the GPU recipe that runs with train.compile as written (the others with it off, to save time)
COMPILED_RECIPE = "gpu_7b_zero3.yaml"
PRETRAIN_RECIPES = sorted(p.name for p in (ROOT / "configs" / "pretrain").glob("*.yaml")
                          if f"pretrain/{p.name}" not in COVERED)
FINETUNE_RECIPES = sorted(p.name for p in (ROOT / "configs" / "finetune").glob("*.yaml")
                          if f"finetune/{p.name}" not in COVERED)


def recipe(kind: str, name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / kind / name).read_text())


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from tests.datasets import shared_token_dataset

    return shared_token_dataset(tmp_path_factory)


def shrink_pretrain(name: str, cfg: dict, manifest: Path, run_dir: Path, tiny_model: Path) -> list[str]:
    """Overrides that shrink a pretraining recipe to the tests' size and nothing else (a recipe
    that continues another run starts from a tiny model directory of the preset's shape)."""
    sources = len(cfg["data"]["manifests"])
    micro = cfg["train"]["micro_batch_size"]
    out = [f"run_dir={run_dir}", f"data.manifests=[{','.join([str(manifest)] * sources)}]",
           "model.preset=tiny", "model.max_seq_len=64", "train.device=cpu", f"train.max_steps={STEPS}",
           "train.eval_every=2", "train.eval_batches=2", "checkpoint.every=2", "log.every=1"]
    if cfg.get("init_from"):
        out.append(f"init_from={tiny_model}")
    if cfg["train"].get("global_batch_size"):
        out.append(f"train.global_batch_size={micro * 2 * 2}")  # 2 accumulated micro batches x 2 ranks
    for key in ("sequence_parallel", "pipeline_stages", "tensor_parallel"):
        if cfg["train"].get(key, 1) > 2:
            out.append(f"train.{key}=2")  # a node's 8 GPUs on the tests' 2 ranks
    if cfg["train"].get("zero", {}).get("zero_hpz_partition_size", 1) > 2:
        out.append("train.zero.zero_hpz_partition_size=2")  # hpZ groups of both ranks instead of a node's 8 GPUs
    if cfg["train"].get("compile") and name != COMPILED_RECIPE:
        # inductor compiles C++ for every batch shape on CPU (~30 s a recipe on 2 cores): one
        # recipe runs compiled (ZeRO-3 hooks, selective checkpointing); tests/test_compile.py
        # compares compiled and eager losses
        out.append("train.compile=false")
    return out


def launch(script: Path, config: str, overrides: list[str], log_dir: Path):
    return run_deepspeed(script, ["--config", config, *overrides], num_gpus=2, timeout=900, log_dir=log_dir)


def test_every_recipe_is_run_by_a_test():
    shipped = {f"{p.parent.name}/{p.name}" for p in (ROOT / "configs").glob("*/*.yaml")
               if p.parent.name in ("pretrain", "finetune")}
    here = {f"pretrain/{n}" for n in PRETRAIN_RECIPES} | {f"finetune/{n}" for n in FINETUNE_RECIPES}
    assert shipped == here | set(COVERED)
    assert here.isdisjoint(COVERED)


@pytest.mark.parametrize("name", PRETRAIN_RECIPES)
def test_pretrain_recipe_runs_as_written(name, manifest, tiny_model_dir, tmp_path):
    from model.io import load_model_dir

    cfg = recipe("pretrain", name)
    run = tmp_path / "run"
    launch(PRETRAIN, f"configs/pretrain/{name}", shrink_pretrain(name, cfg, manifest, run, tiny_model_dir),
           tmp_path / "logs").check()
    got = metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(math.isfinite(got[s]["train/loss"]) for s in got)
    # GPU recipes: a global batch of 2 accumulated micro batches x 2 ranks; CPU ones: their own accumulation
    accum = 2 if cfg["train"].get("global_batch_size") else cfg["train"].get("grad_accum_steps") or 1
    assert got[STEPS]["consumed_samples"] == STEPS * cfg["train"]["micro_batch_size"] * 2 * accum
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in (("train", "zero_stage"), ("train", "precision"), ("train", "offload_optimizer"),
                         ("train", "offload_params"), ("optim", "implementation"),
                         ("model", "activation_checkpointing"), ("data", "num_workers"), ("data", "weights"),
                         ("train", "compile"), ("model", "rope_scaling"), ("model", "attention")):
        if key == "compile" and name != COMPILED_RECIPE:
            continue  # turned off by shrink_pretrain
        if key in cfg.get(section, {}):
            want = cfg[section][key]
            got = resolved[section][key]
            if isinstance(want, dict):  # a sub-section: the keys the recipe sets
                got = {k: got[k] for k in want}
            assert got == want, f"{section}.{key}"
    if cfg.get("init_from"):
        assert json.loads((run / "init_from.json").read_text())["init_from"] == str(tiny_model_dir)
    ds = json.loads((run / "deepspeed_config.json").read_text())
    # a model-parallel group of the 2 ranks is one data-parallel rank: twice the accumulation
    model_parallel = max(min(cfg["train"].get(k, 1), 2) for k in ("sequence_parallel", "pipeline_stages", "tensor_parallel"))
    assert ds["gradient_accumulation_steps"] == accum * (model_parallel if cfg["train"].get("global_batch_size") else 1)
    assert ds["zero_optimization"]["stage"] == cfg["train"]["zero_stage"]
    for key, value in cfg["train"].get("zero", {}).items():
        got = ds.get(key) if key == "communication_data_type" else ds["zero_optimization"][key]
        assert got == (2 if key == "zero_hpz_partition_size" else value), f"train.zero.{key}"
    log = (run / "logs" / "rank0.log").read_text()
    assert ("torch.compile on: 2 Transformer blocks" in log) == (name == COMPILED_RECIPE), log[-2000:]
    wanted = "DeepSpeedCPUAdam" if cfg.get("optim", {}).get("implementation") == "deepspeed" else "SkippingAdamW"
    assert f"optimizer {wanted}" in log, log[-2000:]
    latest = json.loads((run / "latest.json").read_text())
    assert latest["step"] == STEPS
    model, _ = load_model_dir(run / latest["model_dir"])  # written from bf16 and ZeRO-3 shards too
    assert all(p.isfinite().all() for p in model.parameters())


def _synthetic_table(out: Path, columns: list[str], delimiter: str, header: bool) -> Path:
    """A table with the recipe's own column layout, filled with the bundled UCI sentences (the
    recipe's own data are not redistributable)."""
    rows = []
    for line in (ROOT / "data/sample/finetune/uci_sentiment/imdb_labelled.txt").read_text().splitlines():
        text, _, label = line.rpartition("\t")
        if text.strip():
            rows.append({"label": label.strip(), "text": text.strip(), "title": text.strip()[:40],
                         "description": text.strip()})
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE,
                            escapechar="\\")
        if header:
            writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in rows])
    return out


def shrink_finetune(name: str, cfg: dict, tmp_path: Path) -> list[str]:
    task = cfg["task"]
    out = []
    if not all((ROOT / f).is_file() for f in ([task["train"]] if isinstance(task["train"], str) else task["train"])):
        delimiter = "\t" if task["format"] == "tsv" else ","
        table = _synthetic_table(tmp_path / f"{name}.{task['format']}", task["columns"], delimiter,
                                 header=task.get("skip_header_row", False))
        out += [f"task.train={table}", "task.dev=null", "task.test=null"]
    return out + [f"task.max_length={min(task['max_length'], 128)}", f"train.max_steps={STEPS}",
                  "train.eval_every=2", "train.device=cpu", "schedule.warmup_steps=1"]


@pytest.mark.parametrize("name", FINETUNE_RECIPES)
def test_finetune_recipe_runs_as_written(name, tiny_model_dir, tmp_path):
    cfg = recipe("finetune", name)
    run = tmp_path / "run"
    overrides = [f"init_from={tiny_model_dir}", f"run_dir={run}", *shrink_finetune(name, cfg, tmp_path)]
    launch(FINETUNE, f"configs/finetune/{name}", overrides, tmp_path / "logs").check()
    record = json.loads((run / "metrics.json").read_text())
    assert record["step"] == STEPS
    expected = {"classification": {"accuracy", "macro_f1", "majority_rate"},
                "token_classification": {"precision", "recall", "f1"},
                "qa": {"exact_match", "f1", "answers_not_on_token_boundaries"}}[cfg["task"]["kind"]]
    assert expected <= set(record["test"]) and expected <= set(record["dev"])
    assert (run / "predictions_test.jsonl").stat().st_size > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["zero_stage"] == cfg["train"]["zero_stage"]
    assert resolved["train"]["micro_batch_size"] == cfg["train"]["micro_batch_size"]


# ------------------------------------------------------------------ precision and offload

def _tiny_run(tmp_path: Path, manifest: Path, name: str, *overrides: str) -> dict[int, dict]:
    run = tmp_path / name
    launch(PRETRAIN, "configs/pretrain/cpu_tiny.yaml",
           [f"run_dir={run}", f"data.manifests=[{manifest}]", "train.max_steps=8", "checkpoint.every=0",
            "train.eval_every=0", "checkpoint.write_model_dir=false", "log.every=1", *overrides],
           tmp_path / f"{name}-logs").check()
    return metrics(run)


def test_bf16_follows_fp32_within_tolerance(manifest, tmp_path):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 % per operation) in weights,
    activations and gradients, while the fp32 master weights and the loss (from fp32 logits)
    keep full precision. The tiny model's per-token loss sits near log(vocab), where logit noise
    of that size moves it little: over 8 steps bf16 measured within 6.5e-5 (relative) of fp32;
    the tolerance of 2e-3 leaves 30x room, and a bf16 master copy (updates rounded away) or a
    bf16 softmax moves the loss by more."""
    fp32 = _tiny_run(tmp_path, manifest, "fp32", "train.zero_stage=1")
    bf16 = _tiny_run(tmp_path, manifest, "bf16", "train.zero_stage=1", "train.precision=bf16")
    for step in range(1, 9):
        assert bf16[step]["train/loss"] == pytest.approx(fp32[step]["train/loss"], rel=2e-3), step
    assert bf16[8]["train/loss"] < bf16[1]["train/loss"]


def test_optimizer_offload_gives_the_losses_of_no_offload(manifest, tmp_path):
    """The same torch AdamW on the same fp32 partitions, on the host either way: bit-identical."""
    plain = _tiny_run(tmp_path, manifest, "plain", "train.zero_stage=2")
    offload = _tiny_run(tmp_path, manifest, "offload", "train.zero_stage=2", "train.offload_optimizer=cpu")
    for step in range(1, 9):
        assert offload[step]["train/loss"] == plain[step]["train/loss"], step
        assert offload[step]["train/grad_norm"] == pytest.approx(plain[step]["train/grad_norm"], rel=1e-6), step
