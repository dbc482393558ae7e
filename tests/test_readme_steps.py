"""The README's step-by-step commands, run exactly as written (read from README.md), and stopping
a run by killing the ``deepspeed`` command.

The commands use paths relative to the checkout (``launcher/``, ``configs/``, ``data/sample``) and
write ``runs/``; they run in a temporary folder whose ``launcher``, ``configs`` and ``data`` link
to this checkout, so the repository's own ``runs/`` is left alone. ``python`` and ``deepspeed``
are the virtual environment's (first on PATH). The sample data are prepared once for the module
(the README's first command, about 10 s) and shared by both tests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import ROOT, VENV_BIN, cpu_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PREPARE = "launcher/prepare_data.py --config configs/data/sample.yaml output=runs/sample"
PRETRAIN = "launcher/pretrain.py --config configs/pretrain/cpu_tiny.yaml"


def readme_steps() -> list[str]:
    """The command lines of the README's bash block that prepares the sample and pretrains
    cpu_tiny (the Quickstart's step by step), comments removed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        if PREPARE in block and PRETRAIN in block:
            return [shlex.join(shlex.split(line, comments=True)) for line in block.splitlines()
                    if shlex.split(line, comments=True)]
    raise AssertionError("README.md has no bash block with the prepare_data and cpu_tiny steps")


def run_step(line: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"$ {line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder that looks like the checkout, with the README's first step (prepare_data) done."""
    checkout = tmp_path_factory.mktemp("readme")
    for name in ("launcher", "configs", "data"):
        (checkout / name).symlink_to(ROOT / name)
    steps = readme_steps()
    assert PREPARE in steps[0], steps
    run_step(steps[0], checkout)
    return checkout, steps[1:]


def test_readme_steps_run_as_written(prepared):
    checkout, steps = prepared
    assert any(PRETRAIN in line and line.startswith("DS_ACCELERATOR=cpu deepspeed --num_gpus 2") for line in steps)
    outputs = [run_step(line, checkout) for line in steps]
    runs = checkout / "runs"
    manifest = json.loads((runs / "sample/shards/manifest.json").read_text())
    assert manifest["seq_len"] == 256
    latest = json.loads((runs / "cpu_tiny/latest.json").read_text())
    assert latest["step"] == 20
    # the tiny preset's context (128) grew to the shards' 256, in the model and in the resolved config
    model_cfg = json.loads((runs / "cpu_tiny" / latest["model_dir"] / "model_config.json").read_text())
    assert model_cfg["max_seq_len"] == 256
    assert "max_seq_len: 256" in (runs / "cpu_tiny/config.yaml").read_text()
    pretrain_out = next(p for line, p in zip(steps, outputs) if PRETRAIN in line)
    # DeepSpeed's "untested optimizer" warning is not shown for our AdamW subclass
    assert "untested optimizer" not in pretrain_out.stdout + pretrain_out.stderr
    assert any("The bushfire" in p.stdout for p in outputs), "generate printed no continuation"
    report = (runs / "report.md").read_text()
    for part in ("## Data funnel", "## Tokenizer", "## Token shards", "seq_len 256", "## Pretraining", "tokens/s"):
        assert part in report, part
    assert (runs / "funnel.png").stat().st_size > 5_000 and (runs / "pretrain_loss.png").stat().st_size > 5_000

    # report.py on one cleaning output: report and funnel beside it, the funnel table printed
    single = run_step("python launcher/report.py runs/sample/clean", checkout)
    assert "report written to runs/sample/clean/report.md" in single.stdout and "TOTAL" in single.stdout
    assert (runs / "sample/clean/funnel.png").stat().st_size > 5_000
    # a directory that is absent or holds no stage output is noted and skipped
    from training.report import write_report

    partial = write_report([runs / "cpu_tiny", runs / "finetune", checkout / "launcher"], runs / "partial" / "report.md",
                           tensorboard=False).read_text()
    assert "## Pretraining" in partial and "## Data funnel" not in partial
    assert f"`{runs / 'finetune'}`: does not exist, skipped" in partial
    assert f"`{checkout / 'launcher'}`: not the output of" in partial


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"train/loss"' in x]


def test_killing_the_deepspeed_command_stops_every_rank_after_a_checkpoint(prepared):
    """``kill <pid of deepspeed>`` (SIGTERM to the runner, which forwards nothing on one node):
    the ranks notice, save at the next step boundary and exit 0; no process of the run is left."""
    import psutil

    checkout, steps = prepared
    words = shlex.split(next(line for line in steps if PRETRAIN in line))
    env = cpu_env({"CRUCIBLE_FAULT_STEP_SLEEP": "0.5"})  # steps slow enough to signal mid-run
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[0] == "deepspeed"
    run_dir = checkout / "runs" / "stopped"
    with open(checkout / "stopped.log", "w") as log:
        proc = subprocess.Popen([str(VENV_BIN / "deepspeed"), *words[1:], f"run_dir={run_dir}"], cwd=checkout,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not _metrics_steps(run_dir) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _metrics_steps(run_dir), (checkout / "stopped.log").read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in family if "--local_rank" in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in family]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        _, alive = psutil.wait_procs(family, timeout=120)
        assert not alive, f"left running after the deepspeed command was killed: {[p.pid for p in alive]}"
    finally:
        try:  # whatever failed, leave nothing of this run behind (the group outlives the runner)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    launcher_log = (checkout / "stopped.log").read_text()
    for rank in ranks:  # DeepSpeed's launch.py saw each rank exit 0
        assert f"Process {rank.pid} exits successfully" in launcher_log, launcher_log[-3000:]
    stopped = max(_metrics_steps(run_dir))
    assert stopped < 20
    latest = json.loads((run_dir / "latest.json").read_text())
    assert latest["step"] == stopped and (run_dir / latest["checkpoint"] / "COMPLETE.json").is_file()
    # each rank polls its launcher once a second; the first to notice stops every rank through the
    # step's preemption flag (max over ranks), so the others may stop before their own poll sees it
    logs = [(run_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    noticed = f"the deepspeed command (pid {proc.pid}) exited: stopping as on SIGTERM"
    assert any(noticed in text for text in logs), logs[0][-2000:]
    for text in logs:
        assert f"preemption signal: saving a checkpoint at step {stopped} and exiting" in text, text[-2000:]
