"""Data-mix phases (``data.phases``): the training stream switches to another mix at declared steps.

Phase 0 is ``data.manifests``/``data.weights`` from step 0; phase ``k`` starts at its start step
``s_k`` and is a training loader of its own (:class:`~data_pipeline.loader.train.TrainLoader`)
over its manifests, its order seeded by ``(data.seed, k)`` (phase 0 keeps ``data.seed``, so a
run without phases reads exactly what it read before). Phase ``k`` hands out the global batches
of steps ``[s_k, s_{k+1})``, starting at the beginning of its own order: a manifest that is in two
phases is read again from its first sample, in another permutation.

Switch points are counted in samples (``s_k x samples per step``), so the loader needs no step
counter and the position after any batch is exact. The state (:meth:`PhasedTrainLoader.
state_dict`) holds the current phase and the loader state of every phase begun; on resume those
phases must be unchanged, while phases not begun yet may be changed, added or removed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from crucible.errors import ConfigError, DataError
from data_pipeline.loader.base import ResumableStream
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.train import STATE_FORMAT, TrainLoader

PHASES_FORMAT = "crucible.loader-phases/1"


def phase_seed(seed: int, phase: int) -> int:
    """The order seed of phase ``phase`` (phase 0: ``seed`` itself)."""
    if phase == 0:
        return seed
    return int(np.random.SeedSequence([int(seed), 0x70686173, int(phase)]).generate_state(1, np.uint64)[0] >> 1)


def phase_start_steps(cfg: LoaderConfig, tokens_per_step: int, max_steps: int) -> list[int]:
    """The first step of every phase, phase 0's (0) included; a ``start_tokens`` phase starts
    at the first step that begins with at least that many tokens consumed."""
    starts = [0]
    for k, phase in enumerate(cfg.phases, start=1):
        step = phase.start_step if phase.start_step is not None else math.ceil(phase.start_tokens / tokens_per_step)
        what = (f"data.phases[{k - 1}].start_step={step}" if phase.start_step is not None else
                f"data.phases[{k - 1}].start_tokens={phase.start_tokens} (step {step} at {tokens_per_step} "
                "tokens per step)")
        if step <= starts[-1]:
            raise ConfigError(f"{what} does not start after the phase before it (step {starts[-1]}); "
                              "list data.phases in order of their start, each in a later step")
        if step >= max_steps:
            raise ConfigError(f"{what} is not before train.max_steps={max_steps}: the phase would never "
                              "train; start it earlier or raise train.max_steps")
        starts.append(step)
    return starts


def phase_at(starts: list[int], step: int) -> int:
    """Index of the phase that step ``step`` trains in (``starts``: :func:`phase_start_steps`)."""
    return bisect.bisect_right(starts, step) - 1


def phase_config(cfg: LoaderConfig, phase: int) -> LoaderConfig:
    """The single-mix loader config of phase ``phase`` (its manifests, weights and order seed)."""
    if phase == 0:
        return cfg.model_copy(update={"phases": []})
    p = cfg.phases[phase - 1]
    return cfg.model_copy(update={"manifests": list(p.manifests), "weights": p.weights,
                                  "seed": phase_seed(cfg.seed, phase), "phases": []})


class PhasedTrainLoader(ResumableStream):
    """The training stream of one rank over data phases: the loader of phase ``k`` hands out the
    batches of steps ``[s_k, s_{k+1})``. The same interface as :class:`TrainLoader` (iteration,
    ``state_dict``/``load_state_dict``, counters); seq_len and tokenizer are phase 0's, which
    every phase must share."""

    def __init__(self, cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                 samples_per_step: int, max_steps: int) -> None:
        if samples_per_step % (micro_batch_size * world_size):
            raise DataError(f"samples per step {samples_per_step} is not a multiple of the global micro "
                            f"batch {micro_batch_size} x {world_size}")
        self.cfg = cfg
        self.loaders = [TrainLoader(phase_config(cfg, k), micro_batch_size, rank, world_size)
                        for k in range(len(cfg.phases) + 1)]
        first = self.loaders[0]
        for k, loader in enumerate(self.loaders[1:], start=1):
            for what, mine, theirs in (("tokenizer sha256", loader.tokenizer.get("sha256"), first.tokenizer.get("sha256")),
                                       ("seq_len", loader.seq_len, first.seq_len),
                                       ("dtype", loader.sources[0].manifest.data["dtype"],
                                        first.sources[0].manifest.data["dtype"])):
                if mine != theirs:
                    raise DataError(
                        f"data.phases[{k - 1}] manifest {loader.sources[0].manifest.location} differs from data.manifests "
                        f"in {what} ({mine} vs {theirs}); every phase must use shards of the same "
                        "tokenizer, seq_len and dtype")
        self.samples_per_step = samples_per_step
        self.start_steps = phase_start_steps(cfg, samples_per_step * first.seq_len, max_steps)
        self.start_samples = [s * samples_per_step for s in self.start_steps]
        self.phase = 0
        self._iterator: Iterator[torch.Tensor] | None = None

    # -- what the step module reads
    @property
    def seq_len(self) -> int:
        return self.loaders[0].seq_len

    @property
    def vocab_size(self) -> int:
        return self.loaders[0].vocab_size

    @property
    def tokenizer(self) -> dict:
        return self.loaders[0].tokenizer

    @property
    def manifest_sha256s(self) -> list[str]:
        """sha256 of every manifest of every phase, in phase order (repeats left out)."""
        return list(dict.fromkeys(s for loader in self.loaders for s in loader.manifest_sha256s))

    @property
    def global_batch_size(self) -> int:
        return self.loaders[0].global_batch_size

    @property
    def skipped_samples(self) -> int:
        return sum(loader.skipped_samples for loader in self.loaders)

    @property
    def stats(self) -> dict:
        return self.loaders[self.phase].stats

    @property
    def consumed_samples(self) -> int:
        """Global samples handed out so far over all phases (this rank's view of the order)."""
        return self.start_samples[self.phase] + self.loaders[self.phase].consumed_samples

    # -- iteration
    def _generate(self) -> Iterator[torch.Tensor]:
        while True:
            while self.phase + 1 < len(self.loaders) and self.consumed_samples >= self.start_samples[self.phase + 1]:
                self.phase += 1
            loader = self.loaders[self.phase]
            end = self.start_samples[self.phase + 1] if self.phase + 1 < len(self.loaders) else None
            batches = iter(loader)
            try:
                while end is None or self.consumed_samples < end:
                    yield next(batches)
            finally:
                loader.close()  # its readers and DataLoader workers go at the switch

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": PHASES_FORMAT,
            "phase": self.phase,
            "consumed_samples": self.consumed_samples,
            "samples_per_step": self.samples_per_step,
            "start_steps": self.start_steps[:self.phase + 1],
            "phases": [self.loaders[k].state_dict() for k in range(self.phase + 1)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken. A single-mix loader state (a run started without
        phases) is phase 0's: phases may be declared from its step on."""
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            state = {"format": PHASES_FORMAT, "phase": 0, "samples_per_step": self.samples_per_step,
                     "start_steps": [0], "phases": [state]}
        if not isinstance(state, dict) or state.get("format") != PHASES_FORMAT:
            raise DataError(f"not a loader state (format {PHASES_FORMAT!r} or {STATE_FORMAT!r} expected)")
        phase = int(state["phase"])
        if state["samples_per_step"] != self.samples_per_step:
            raise DataError(
                f"the checkpoint's data phases were laid out for {state['samples_per_step']} samples per "
                f"step, this run has {self.samples_per_step}; resume with the same global batch size")
        if phase >= len(self.loaders):
            raise DataError(
                f"the checkpoint is in data phase {phase} (data.phases[{phase - 1}]), but this run declares "
                f"only {len(self.loaders) - 1} data phases; keep every phase that has begun")
        for k in range(1, phase + 1):
            if state["start_steps"][k] != self.start_steps[k]:
                raise DataError(
                    f"data.phases[{k - 1}] began at step {state['start_steps'][k]} in the checkpoint, this "
                    f"run declares step {self.start_steps[k]}; a phase that has begun cannot move")
        consumed = self.start_samples[phase] + int(state["phases"][phase]["consumed_samples"])
        if phase + 1 < len(self.loaders) and consumed > self.start_samples[phase + 1]:
            step = consumed / self.samples_per_step
            raise DataError(
                f"the checkpoint is at step {step:g}, past the start step {self.start_steps[phase + 1]} of "
                f"data.phases[{phase}], which it has not begun; a phase must start at or after the step "
                f"resumed from: declare it from step {math.ceil(step)} on")
        self._close_iterator()
        for k in range(phase + 1):
            try:
                self.loaders[k].load_state_dict(state["phases"][k])
            except DataError as exc:
                where = "data.manifests" if k == 0 else f"data.phases[{k - 1}]"
                raise DataError(f"data phase {k} ({where}): {exc}") from None
        for loader in self.loaders[phase + 1:]:
            loader.rewind()
        self.phase = phase


def build_train_stream(cfg: LoaderConfig, micro_batch_size: int, rank: int, world_size: int,
                       samples_per_step: int, max_steps: int) -> TrainLoader | PhasedTrainLoader:
    """The training stream of one rank: a :class:`TrainLoader` without ``data.phases`` (its
    state as before phases existed), else a :class:`PhasedTrainLoader` switching at the phases'
    start steps (``samples_per_step``: the global batch of one optimizer step)."""
    if not cfg.phases:
        return TrainLoader(cfg, micro_batch_size, rank, world_size)
    return PhasedTrainLoader(cfg, micro_batch_size, rank, world_size, samples_per_step, max_steps)
