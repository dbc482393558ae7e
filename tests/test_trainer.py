"""The training loop's contract with step modules and callbacks, on 2 CPU ranks over gloo with a
real DeepSpeed engine and the smallest possible workload (a linear regression step module):
event order, evaluation and checkpoint cadence, a callback's stop, resume, and a loop without
checkpoints or evaluation. The language-model and task workloads on the same loop are tested
end to end in test_pretrain_distributed.py, test_finetune.py and test_lr_find.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.harness import run_on_ranks

STEPS = 5


class _Numbers:
    """Micro batches (x, y) with y = x . (1, 2, 3, 4): a pure function of the position."""

    def __init__(self, rank: int, world: int, micro: int) -> None:
        self.rank, self.world, self.micro, self.position = rank, world, micro, 0

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(self.position * self.world + self.rank)
            self.position += 1
            x = torch.randn(self.micro, 4, generator=g)
            yield x, x @ torch.tensor([[1.0], [2.0], [3.0], [4.0]])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def _regression_step(cfg, ctx):
    import torch
    import torch.nn.functional as F

    from model.config import ModelConfig, resolve_model_config
    from training.engine import build_engine
    from training.optim import build_optimizer, param_groups
    from training.steps.base import StepModule, StepOutput

    class RegressionStep(StepModule):
        """Squared error of a linear model: a whole workload in a few lines."""

        model_cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=64)
        seq_len = 1
        run_config = cfg
        evaluations = 0

        def prepare(self, plan):
            return _Numbers(ctx.rank, ctx.world_size, plan.micro_batch_size)

        def build_engine(self, ds_config):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 1, bias=False)
            optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim, cfg.train.zero_stage)
            self.engine, self.optimizer = build_engine(model, ds_config, optimizer)
            return self.engine, self.optimizer

        def train_step(self, batch, step):
            total, count = 0.0, 0
            for x, y in batch:
                loss = F.mse_loss(self.engine(x), y, reduction="sum")
                self.engine.backward(loss / len(x))
                self.engine.step()
                total, count = total + loss.item(), count + len(x)
            return StepOutput(total, float(count), count)

        def evaluate(self):
            self.evaluations += 1
            return {"val/loss": float(self.evaluations)}

        def save_model_dir(self, out: Path, state_dict) -> None:
            assert state_dict is None  # a save writes the model directory's files but the weights
            out.mkdir(parents=True, exist_ok=True)
            (out / "workload.json").write_text(json.dumps({"kind": "regression"}))

    return RegressionStep()


def _recorder(stop_at: int | None):
    from training.callbacks.base import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[str] = []

        def pre_step(self, trainer, batch):
            self.events.append(f"pre_step {trainer.state.step} x{len(batch)}")

        def post_eval(self, trainer, metrics):
            self.events.append(f"post_eval {trainer.state.step} {metrics['val/loss']:g}")

        def post_step(self, trainer, metrics):
            self.events.append(f"post_step {trainer.state.step}")
            if trainer.state.step == stop_at:
                trainer.request_stop()

        def rank_saved(self, trainer, path):
            self.events.append(f"rank_saved {path.name} complete={(path / 'COMPLETE.json').exists()}")

        def post_save(self, trainer, path, seconds):
            self.events.append(f"post_save {path.name} complete={(path / 'COMPLETE.json').exists()}")

        def at_end(self, trainer):
            self.events.append(f"at_end finished={trainer.finished}")

    return Recorder()


def _train(rank: int, world_size: int, run_dir: str, overrides: list[str], stop_at: int | None,
           checkpoints: bool, evaluate: bool) -> dict[str, Any]:
    import torch

    from crucible.config import load_config
    from training.callbacks.base import Callback
    from training.config import PretrainConfig
    from training.engine import DistContext
    from training.trainer import Trainer

    cfg = load_config(PretrainConfig, None, [f"run_dir={run_dir}", f"train.max_steps={STEPS}",
                                             "train.micro_batch_size=2", "train.grad_accum_steps=2",
                                             "train.eval_every=2", "checkpoint.every=2", "log.tensorboard=false",
                                             "optim.lr=0.1", "optim.weight_decay=0", "schedule.kind=constant",
                                             "checkpoint.write_model_dir=never", *overrides])
    ctx = DistContext(rank, world_size, rank, torch.device("cpu"))
    recorder = _recorder(stop_at)
    losses: list[float] = []

    class Losses(Callback):  # a second callback sees the same step metrics
        def post_step(self, trainer, metrics):
            losses.append(metrics["train/loss"])

    trainer = Trainer(cfg, ctx, _regression_step(cfg, ctx), [recorder, Losses()],
                      checkpoints=checkpoints, evaluate=evaluate)
    try:
        status = trainer.run()
    finally:
        trainer.preempt.uninstall()
    return {"status": status, "events": recorder.events, "losses": losses, "step": trainer.state.step,
            "consumed": trainer.state.consumed_samples, "data": trainer.data.state_dict()}


@pytest.mark.slow
@pytest.mark.distributed
def test_loop_events_stop_and_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_on_ranks(_train, 2, run_dir, [], 3, True, True, timeout=300)
    for result in first:
        assert result["status"] == 0 and result["step"] == 3 and result["consumed"] == 3 * 8
        assert result["events"] == [
            "pre_step 0 x2", "post_step 1",
            "pre_step 1 x2", "post_eval 2 1", "post_step 2",
            "rank_saved step_00000002 complete=False", "post_save step_00000002 complete=True",
            "pre_step 2 x2", "post_step 3",      # the callback stopped the loop here
            "post_eval 3 2",                      # final evaluation (3 is not a multiple of 2)
            "rank_saved step_00000003 complete=False", "post_save step_00000003 complete=True",
            "at_end finished=False",
        ]
        assert result["data"] == {"position": 3 * 2}  # micro batches drawn by this rank
    assert first[0]["losses"] == first[1]["losses"]  # the loss is reduced over ranks
    # the step module wrote its model files, and training moved the weights (read from the
    # checkpoint's shards) to the target
    import torch

    from model.zero_checkpoint import iter_fp32_weights

    ckpt = Path(run_dir) / "checkpoints" / "step_00000003"
    assert json.loads((ckpt / "model_files" / "workload.json").read_text()) == {"kind": "regression"}
    trained = dict(iter_fp32_weights(ckpt))["weight"]
    torch.manual_seed(0)
    initial = torch.nn.Linear(4, 1, bias=False).weight.detach()
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert (trained - target).norm() < (initial - target).norm() - 0.1

    resumed = run_on_ranks(_train, 2, run_dir, [], None, True, True, timeout=300)
    for result in resumed:
        assert result["step"] == STEPS and result["data"] == {"position": STEPS * 2}
        assert result["events"][0] == "pre_step 3 x2"
        assert result["events"][-3:] == ["rank_saved step_00000005 complete=False",
                                          "post_save step_00000005 complete=True", "at_end finished=True"]


@pytest.mark.slow
@pytest.mark.distributed
def test_loop_without_checkpoints_or_evaluation(tmp_path):
    run_dir = tmp_path / "bare"
    results = run_on_ranks(_train, 2, str(run_dir), [], None, False, False, timeout=300)
    for result in results:
        assert result["step"] == STEPS
        assert not [e for e in result["events"] if not e.startswith(("pre_step", "post_step", "at_end"))]
    assert not (run_dir / "checkpoints").exists()


def test_metrics_logger_joins_an_evaluation_to_its_step_and_writes_the_final_one_alone(tmp_path):
    from training.callbacks.metrics import MetricsLogger

    state = SimpleNamespace(step=0, consumed_samples=0)
    trainer = SimpleNamespace(state=state)
    logger = MetricsLogger(tmp_path, rank=0, every=10, tensorboard=False)
    for step in (1, 2):
        state.step, state.consumed_samples = step, 8 * step
        if step == 2:
            logger.post_eval(trainer, {"val/loss": 3.5})
        logger.post_step(trainer, {"train/loss": 4.0 - step})
    logger.post_eval(trainer, {"val/loss": 3.25})  # after the last step
    logger.at_end(trainer)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "consumed_samples": 8, "train/loss": 3.0},
                       {"step": 2, "consumed_samples": 16, "train/loss": 2.0, "val/loss": 3.5},
                       {"step": 2, "consumed_samples": 16, "val/loss": 3.25}]
    assert not (tmp_path / "tensorboard").exists()
    assert not MetricsLogger(tmp_path / "r1", rank=1, every=1, tensorboard=True).jsonl


def test_fault_injection_is_absent_unless_asked_for():
    from training.callbacks.faults import FaultInjection

    assert FaultInjection.from_env({}) is None
    faults = FaultInjection.from_env({"CRUCIBLE_FAULT_NAN_STEPS": "2, 3", "CRUCIBLE_FAULT_KILL_IN_SAVE": "6"})
    assert faults.nan_steps == {2, 3} and faults.nan_rank == 0
    assert faults.kill_in_save_step == 6 and faults.fault_rank == 1 and not faults.record_samples


def test_step_modules_hold_no_test_hooks():
    root = Path(__file__).resolve().parent.parent / "training" / "steps"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "CRUCIBLE_" not in text and "faults" not in text, path


def test_schedules_are_objects_the_loop_asks():
    from training.config import ScheduleConfig
    from training.schedule import ConfiguredSchedule, ExponentialSchedule, lr_at

    exp = ExponentialSchedule(1e-6, 1.0, 13)
    assert exp(0) == pytest.approx(1e-6) and exp(12) == pytest.approx(1.0)
    assert exp(6) == pytest.approx(1e-3)
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3)
    assert [ConfiguredSchedule(0.1, cfg, 20)(s) for s in range(20)] == [lr_at(s, 0.1, cfg, 20) for s in range(20)]
