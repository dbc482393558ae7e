"""In-loop downstream evaluation: lm-evaluation-harness tasks on the model being trained, every
``harness.every`` steps and after the last step (section ``harness``).

Rank 0 evaluates its own copy of the weights (``engine.module``, whole under ZeRO 0-2; ZeRO-3 is
refused by the config) while the other ranks go on to the next step's collective and wait there,
so an evaluation must take well under ``train.collective_timeout_s`` (``harness.limit`` bounds
it; its time is logged as ``eval/harness_seconds`` and a warning comes when it used half the
timeout). The model returns to training mode and Python, NumPy and torch random states are
restored afterwards (the harness seeds them), so training continues as without the evaluation.

Each evaluation writes its scalars ``eval/<task>/<metric>`` as a record of their own in
``metrics.jsonl`` (with the step) and to TensorBoard at that step, and the harness's results
JSON to ``<run_dir>/eval/step_NNNNNNNN/results.json``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.errors import DataError
from training.callbacks.base import Callback
from training.callbacks.metrics import TensorBoardWriter
from training.config import HarnessConfig

log = logging.getLogger("crucible.training.harness")


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Python, NumPy and torch (CPU and CUDA) random states as they were before the block."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class HarnessEvaluation(Callback):
    """Runs ``cfg.tasks`` on rank 0 every ``cfg.every`` steps and after the last one."""

    def __init__(self, cfg: HarnessConfig, run_dir: Path, rank: int, tensorboard: bool,
                 collective_timeout_s: float) -> None:
        self.cfg, self.run_dir, self.rank = cfg, Path(run_dir), rank
        self.collective_timeout_s = collective_timeout_s
        self.tensorboard = TensorBoardWriter(self.run_dir / "tensorboard", rank == 0 and tensorboard)
        self.manager: Any = None
        self.last_step = -1
        if rank == 0:  # unknown task names fail before training starts
            from training.harness_eval import task_manager

            self.manager = task_manager(cfg.tasks, cfg.include_path)

    def post_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.cfg.every and trainer.state.step % self.cfg.every == 0:
            self.evaluate(trainer)

    def at_end(self, trainer: Any) -> None:
        if trainer.finished and self.last_step != trainer.state.step:
            self.evaluate(trainer)
        self.tensorboard.close()

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """Run the tasks now (rank 0; other ranks return at once); returns the scalars written."""
        step = self.last_step = trainer.state.step
        if self.rank != 0:
            return {}
        from model.generate import TextTokenizer
        from training.harness_eval import evaluate_tasks, scalar_metrics, write_results
        from training.harness_lm import CrucibleLM

        model = trainer.step_module.engine.module
        tokenizer = TextTokenizer(self._tokenizer_dir(trainer))
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with preserved_random_state():
                lm = CrucibleLM(model, tokenizer, batch_size=self.cfg.batch_size)
                results = evaluate_tasks(lm, self.cfg.tasks, self.cfg.include_path, limit=self.cfg.limit,
                                         num_fewshot=self.cfg.num_fewshot, bootstrap_iters=0,
                                         manager=self.manager)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        scalars = {**scalar_metrics(results), "eval/harness_seconds": seconds}
        write_results(results, self.run_dir / "eval" / f"step_{step:08d}")
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "consumed_samples": trainer.state.consumed_samples,
                                **scalars}) + "\n")
        self.tensorboard.scalars(step, scalars)
        log.info("step %d harness evaluation (%.1f s): %s", step, seconds,
                 " ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in scalars.items()))
        if seconds > 0.5 * self.collective_timeout_s:
            log.warning("the harness evaluation took %.0f s, over half of train.collective_timeout_s="
                        "%g s that the other ranks wait at most; lower harness.limit or raise the "
                        "timeout", seconds, self.collective_timeout_s)
        return scalars

    def _tokenizer_dir(self, trainer: Any) -> Path:
        copied = self.run_dir / "tokenizer"  # written by rank 0 at start-up
        source = getattr(trainer.step_module, "tokenizer_dir", None)
        for folder in (copied, source):
            if folder is not None and ((Path(folder) / "tokenizer.model").is_file()
                                       or (Path(folder) / "tokenizer.json").is_file()):
                return Path(folder)
        raise DataError("harness evaluation needs the tokenizer of the training data, but the token "
                        "manifest names no tokenizer folder that exists; rebuild the shards with "
                        "launcher/shard.py or clear harness.tasks")
