"""Configuration of the streaming training loader (section ``data`` of pretraining)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crucible.config import Section


class PhaseSchedule(Section):
    """The learning-rate segment of a data phase (``data.phases[k].schedule``): from the phase's
    first step to the step before the next phase that declares its own segment (else the run's
    last step, ``train.max_steps - 1``)."""

    kind: Literal["linear", "cosine", "constant"] = "linear"
    """Shape from the segment's first LR to its last: linear or cosine decay, or constant."""
    start_lr_ratio: float | None = Field(None, ge=0)
    """LR at the phase's first step as a fraction of optim.lr (null: the LR the schedule before
    this phase has at that step, so the LR does not jump)."""
    min_lr_ratio: float = Field(0.0, ge=0)
    """LR at the segment's last step as a fraction of optim.lr (linear and cosine; 0: anneal to zero)."""


class DataPhase(Section):
    """A later data mix (one entry of ``data.phases``): from its start on, the loader reads these
    manifests with these weights, in an order of its own (seeded by data.seed and the phase's
    index), and the LR may follow a segment of its own."""

    start_step: int | None = Field(None, gt=0)
    """First optimizer step (0-based) trained on this mix; give this or start_tokens."""
    start_tokens: int | None = Field(None, gt=0)
    """Start at the first step that begins with at least this many training tokens consumed
    (ceil(start_tokens / tokens per step)); give this or start_step."""
    manifests: list[str] = Field(default_factory=list)
    """manifest.json paths (or URLs) of this phase's token-shard sets; the same tokenizer,
    seq_len and dtype as data.manifests."""
    weights: list[float] | None = None
    """Mixing weights, one per manifest (null: proportional to their sample counts)."""
    schedule: PhaseSchedule | None = None
    """The phase's LR segment (null: the LR keeps following the schedule before the phase)."""

    @model_validator(mode="after")
    def _check(self) -> DataPhase:
        if (self.start_step is None) == (self.start_tokens is None):
            raise ValueError("each data phase needs exactly one of start_step and start_tokens")
        if not self.manifests:
            raise ValueError("each data phase needs manifests: the manifest.json of its token shards")
        if self.weights is not None and len(self.weights) != len(self.manifests):
            raise ValueError(f"a data phase has {len(self.weights)} weights for {len(self.manifests)} "
                             "manifests; give one weight per manifest")
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ValueError(f"data phase weights must all be positive, got {self.weights}")
        return self


class LoaderConfig(Section):
    """Token-shard streaming loader (section ``data``)."""

    manifests: list[str] = Field(default_factory=list)
    """manifest.json paths (or URLs) of token-shard sets to train on."""
    weights: list[float] | None = None
    """Mixing weights, one per manifest (null: proportional to their sample counts)."""
    seed: int = 1234
    """Shuffle seed; the sample order is a pure function of seed and manifests."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0: read in the training process); the batches do
    not depend on it."""
    shuffle_buffer_shards: int = Field(4, gt=0)
    """Shards whose samples are shuffled together: each epoch permutes the shards, then the
    samples within each window of this many consecutive shards (larger: better mixing, reads
    spread over more files at once)."""
    on_corrupt_shard: str = "error"
    """A missing, truncated or changed shard (size or sha256 unlike the manifest, a bad sample
    header): error: stop with a message naming the shard; skip: replace all its samples by
    another row of the same batch and count them (data/skipped_samples in metrics.jsonl)."""
    phases: list[DataPhase] = Field(default_factory=list)
    """Later data mixes, in order of their start (empty: one mix for the whole run). Phase 0 is
    manifests/weights above, from step 0; each phase here switches the loader to its own
    manifests and weights at its start step and may start an LR segment of its own (e.g. the
    last 10 % of the steps on a high-quality mix with the LR annealed to 0). A checkpoint
    resumes in its phase; phases not begun yet may still be changed or added."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest when a reader first opens it, before any
    of its samples is used (the whole shard is read once per rank; sha256 runs at about 1 GB/s
    per core); a mismatch follows on_corrupt_shard. false: only sizes, sample headers and token
    ranges are checked (launcher/shard.py --verify checks a whole set)."""

    @model_validator(mode="after")
    def _check(self) -> LoaderConfig:
        if self.weights is not None and len(self.weights) != len(self.manifests):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries but data.manifests has "
                f"{len(self.manifests)}; give one weight per manifest"
            )
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ValueError(f"data.weights must all be positive, got {self.weights}")
        if self.on_corrupt_shard not in ("error", "skip"):
            raise ValueError(
                f"data.on_corrupt_shard must be 'error' or 'skip', got {self.on_corrupt_shard!r}"
            )
        starts = [p.start_step for p in self.phases if p.start_step is not None]
        if starts != sorted(set(starts)):
            raise ValueError(f"data.phases must be in order of strictly increasing start_step, got {starts}")
        tokens = [p.start_tokens for p in self.phases if p.start_tokens is not None]
        if tokens != sorted(set(tokens)):
            raise ValueError(f"data.phases must be in order of strictly increasing start_tokens, got {tokens}")
        return self

    def all_manifests(self) -> list[str]:
        """Every manifest of the run: phase 0's, then each later phase's (repeats left out)."""
        names = [*self.manifests, *(m for p in self.phases for m in p.manifests)]
        return list(dict.fromkeys(names))
