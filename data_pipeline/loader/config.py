"""Configuration of the streaming training loader (section ``data`` of pretraining)."""

from __future__ import annotations

from pydantic import Field, model_validator

from crucible.config import Section


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
        return self
