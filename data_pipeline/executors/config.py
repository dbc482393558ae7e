"""Settings of the Ray backend of the data stages (section ``ray`` of ``configs/data/*.yaml``).

Kept apart from :mod:`data_pipeline.executors.ray` so that loading a config never imports Ray.
None of these settings changes a run's output; they only say where and how wide it runs.
"""

from __future__ import annotations

from pydantic import Field

from crucible.config import Section


class RayConfig(Section):
    """Where executor=ray runs and how it spreads the work (output never depends on these)."""

    address: str = ""
    """Ray cluster to join: "auto" (the cluster started on this node with `ray start`), ray://host:10001, or
    empty (use RAY_ADDRESS if set, else start a Ray instance on this machine)."""
    num_cpus: int = Field(default=0, ge=0)
    """Only when this run starts its own local Ray instance: CPUs it may use (0: all)."""
    max_retries: int = Field(default=3, ge=0)
    """Times Ray reruns a task whose worker process or node died (tasks are idempotent)."""
    cpus_per_task: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each per-file task."""
    max_in_flight: int = Field(default=0, ge=0)
    """Tasks submitted but not yet collected (0: twice the cluster's CPUs); bounds driver memory."""
    dedup_buckets: int = Field(default=64, ge=1)
    """Hash buckets of the dedup shuffle; each reduce task holds about 1/buckets of all hashes."""
