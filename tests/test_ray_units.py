"""Fast checks of the Ray backend's parts that need no Ray cluster."""

from __future__ import annotations

import socket

import pytest

from crucible.config import load_config
from crucible.errors import ConfigError
from data_pipeline.clean.dedup_ray import map_groups
from data_pipeline.config import DataPrepConfig
from data_pipeline.executors.ray import check_reachable


def test_ray_section_is_configurable_and_checked():
    cfg = load_config(DataPrepConfig, None, ["executor=ray", "ray.address=auto", "ray.dedup_buckets=8"])
    assert (cfg.executor, cfg.ray.address, cfg.ray.dedup_buckets) == ("ray", "auto", 8)
    with pytest.raises(ConfigError, match="ray.dedup_buckets"):
        load_config(DataPrepConfig, None, ["ray.dedup_buckets=0"])
    with pytest.raises(ConfigError, match="ray.adress"):
        load_config(DataPrepConfig, None, ["ray.adress=auto"])


def test_unreachable_address_fails_fast_with_a_user_error():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="nothing answers"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ConfigError, match="nothing answers"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout_s=2)
    check_reachable("auto")  # resolved by Ray itself


def test_map_groups_are_consecutive_and_cover_every_input():
    counts = [5, 0, 70, 30, 0, 0, 200, 1]
    groups = map_groups(counts, docs_per_map=100)
    assert [i for g in groups for i in g] == list(range(len(counts)))
    assert all(sum(counts[i] for i in g) <= 100 or len(g) == 1 for g in groups)
    assert map_groups([0, 0], 100) == [[0, 1]] and map_groups([], 100) == []
