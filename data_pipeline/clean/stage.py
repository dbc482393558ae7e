"""The cleaning stage: raw sources -> clean, deduplicated webdataset document shards.

Three phases, each restartable:

1. **per input** (parallel, on an executor; :mod:`data_pipeline.clean.process`): read ->
   extract -> normalise -> filters -> PII, into the input's files in ``_work/``.
2. **dedup** over all inputs in run order (:func:`data_pipeline.clean.dedup.find_duplicates`,
   or its twin on the cluster, :mod:`data_pipeline.clean.dedup_ray`).
3. **shards**: kept documents in run order into ``docs-NNNNNN.tar``
   (:mod:`data_pipeline.clean.output`), then ``stats.json``, ``config.yaml``,
   ``provenance.json`` and, last, ``_SUCCESS``; ``_work/`` is removed.

Output bytes depend only on the inputs and the ``data`` config, never on the worker count or
on interruptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from crucible.config import config_to_dict
from crucible.errors import ConfigError
from crucible.fileio import atomic_write_json, atomic_write_text
from crucible.provenance import write_provenance
from data_pipeline.clean.config import CleanConfig
from data_pipeline.clean.dedup import find_duplicates
from data_pipeline.clean.dedup_ray import find_duplicates_shuffled
from data_pipeline.clean.output import (
    DOCS,
    REJECTED,
    STATS_FILE,
    CleanShardWriter,
    is_complete,
    mark_complete,
)
from data_pipeline.clean.process import process_input
from data_pipeline.clean.readers.base import InputFile
from data_pipeline.clean.readers.inputs import expand_inputs
from data_pipeline.clean.stats import Stats, check_invariant
from data_pipeline.clean.work import WORK, InputWork, read_zstd_lines
from data_pipeline.config import DataPrepConfig
from data_pipeline.executors.base import build_executor

log = logging.getLogger("crucible.clean")


def run_inputs(cfg: DataPrepConfig, inputs: list[InputFile], work: Path) -> int:
    """Phase 1 for every input without a completion marker; returns how many were already done."""
    done = {i.index for i in inputs if InputWork(work, i.index).done.is_file()}
    todo = [i for i in inputs if i.index not in done]
    cfg_json = cfg.data.model_dump_json()
    tasks = [(cfg_json, inp, str(work), cfg.strict) for inp in todo]
    with tqdm(total=len(inputs), initial=len(done), unit="file", desc="clean", disable=None) as bar:
        for _ in build_executor(cfg.executor, cfg.workers, cfg.ray).map_unordered(process_input, tasks):
            bar.update(1)
    return len(done)


def find_run_duplicates(cfg: DataPrepConfig, inputs: list[InputFile], work: Path) -> dict[int, str]:
    """Phase 2: in this process, or (executor=ray) as a bucketed shuffle on the cluster; same result."""
    exact = [InputWork(work, i.index).exact for i in inputs]
    sigs = [InputWork(work, i.index).sig for i in inputs]
    if cfg.executor != "ray":
        return find_duplicates(exact, sigs, cfg.data.dedup)
    executor = build_executor(cfg.executor, cfg.workers, cfg.ray)
    return find_duplicates_shuffled(exact, sigs, cfg.data.dedup, executor, work, cfg.ray.dedup_buckets)


def write_shards(out: Path, work: Path, inputs: list[InputFile], dropped: dict[int, str],
                 stats: Stats, cfg: CleanConfig) -> dict[str, int]:
    """Phase 3: the kept documents in run order into clean shards (and the rejected ones, when
    asked for); duplicates found in phase 2 move from kept to dropped in ``stats``."""
    docs = CleanShardWriter(out, DOCS, cfg.output.shard_bytes)
    rejected = CleanShardWriter(out / REJECTED, REJECTED, cfg.output.shard_bytes) if cfg.output.write_rejected else None
    global_index = 0
    try:
        for inp in inputs:
            paths = InputWork(work, inp.index)
            for record in read_zstd_lines(paths.docs):
                reason = dropped.get(global_index)
                global_index += 1
                if reason is None:
                    docs.write(record)
                    continue
                stats.undo_keep(record["source"], len(record["text"]), reason, record.get("language"))
                if rejected is not None:
                    rejected.write({**record, "reason": reason})
            if rejected is not None:
                for record in read_zstd_lines(paths.rejected):
                    rejected.write(record)
    finally:
        n_docs = docs.close(at_least_one=True)
        n_rej = rejected.close(at_least_one=False) if rejected is not None else 0
    return {"docs": n_docs, "rejected": n_rej}


def _fingerprint(cfg: DataPrepConfig, inputs: list[InputFile]) -> str:
    """What the intermediate files depend on; a rerun with another fingerprint must not reuse them."""
    key = {"data": config_to_dict(cfg.data),
           "inputs": [(i.path, i.source, i.format, Path(i.path).stat().st_size) for i in inputs]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _check_same_run(out: Path, cfg: DataPrepConfig) -> None:
    """A finished output may only be reused by a run with the same input and data config."""
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    if saved.get("input") != cfg.input or saved.get("data") != config_to_dict(cfg.data):
        raise ConfigError(f"{out} already holds a finished cleaning run with a different input or data "
                          "config; delete it or choose another output=")


def _prepare_work_dir(out: Path, fingerprint: str) -> Path:
    work = out / WORK
    marker = work / "fingerprint"
    if work.is_dir() and marker.is_file() and marker.read_text().strip() != fingerprint:
        raise ConfigError(f"{out} holds an unfinished run with a different data config or inputs; "
                          f"delete {out} (or choose another output=) to start over")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint + "\n")
    return work


def run_clean(cfg: DataPrepConfig) -> dict[str, Any]:
    """Clean ``cfg.input`` (or ``cfg.data.sources``) into ``cfg.output``; return the stats dict."""
    if not cfg.output:
        raise ConfigError("output: required (output=<folder for the clean shards>)")
    out = Path(cfg.output)
    if is_complete(out):
        _check_same_run(out, cfg)
        log.info("%s is already complete; nothing to do", out)
        return json.loads((out / STATS_FILE).read_text(encoding="utf-8"))
    inputs, skipped = expand_inputs(cfg.data, cfg.input)
    for name in skipped:
        log.info("skipping %s: unrecognised extension (set data.sources[].format to read it)", name)
    work = _prepare_work_dir(out, _fingerprint(cfg, inputs))
    resumed = run_inputs(cfg, inputs, work)
    stats = Stats()
    for inp in inputs:
        stats.merge(Stats.from_dict(json.loads(InputWork(work, inp.index).done.read_text())["stats"]))
    dropped = find_run_duplicates(cfg, inputs, work)
    shards = write_shards(out, work, inputs, dropped, stats, cfg.data)
    result = stats.to_dict()
    result["inputs"] = {"files": len(inputs), "skipped_files": sorted(skipped), "shards": shards}
    check_invariant(result)
    atomic_write_json(out / STATS_FILE, result)
    write_provenance(out, cfg)
    mark_complete(out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("cleaned %d inputs (%d resumed from a previous run)", len(inputs), resumed)
    return {**result, "resumed_inputs": resumed}
