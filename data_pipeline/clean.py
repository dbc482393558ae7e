"""The cleaning stage: raw sources -> clean, deduplicated webdataset document shards.

Three phases, each restartable:

1. **per input** (parallel, :mod:`data_pipeline.executor`): read -> extract -> normalise ->
   filters -> PII; kept documents, their exact hashes and MinHash signatures and the input's
   stats go to ``_work/NNNNNN.*``; ``NNNNNN.done.json`` is written last, so a rerun skips
   exactly the inputs that finished.
2. **dedup** over all inputs in run order (:func:`data_pipeline.dedup.find_duplicates`).
3. **shards**: kept documents in run order into ``docs-NNNNNN.tar`` (fixed tar metadata,
   atomic renames), then ``stats.json``, ``config.yaml``, ``provenance.json`` and, last,
   ``_SUCCESS``; ``_work/`` is removed.

Output bytes depend only on the inputs and the ``data`` config, never on the worker count or
on interruptions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zstandard

from crucible.config import config_to_dict
from crucible.errors import ConfigError, DataError
from crucible.provenance import write_provenance
from data_pipeline.config import CleanConfig, DataPrepConfig
from data_pipeline.dedup import MinHasher, exact_hash, find_duplicates
from data_pipeline.documents import Document, ReadError
from data_pipeline.executor import build_executor
from data_pipeline.extract import ExtractTimeout, ExtractTooLarge, extract_html
from data_pipeline.filters import FilterChain
from data_pipeline.normalize import normalize_text
from data_pipeline.readers import InputFile, expand_inputs, read_input, source_config
from data_pipeline.stats import Stats, check_invariant
from data_pipeline.tario import atomic_tar_writer, atomic_write_text

log = logging.getLogger("crucible.clean")

SUCCESS = "_SUCCESS"
WORK = "_work"


def is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished cleaning run (its ``_SUCCESS`` marker exists)."""
    return (Path(out_dir) / SUCCESS).is_file()


# ----------------------------------------------------------------------------- phase 1


class _InputWork:
    """Paths of one input's intermediate files."""

    def __init__(self, work: Path, index: int) -> None:
        stem = work / f"{index:06d}"
        self.docs = stem.with_suffix(".docs.jsonl.zst")
        self.rejected = stem.with_suffix(".rejected.jsonl.zst")
        self.exact = stem.with_suffix(".exact.u64")
        self.sig = stem.with_suffix(".sig.u32")
        self.done = stem.with_suffix(".done.json")


class _RawRows:
    """Appends fixed-width rows (exact hashes, signatures) to a raw binary file; memory stays flat."""

    def __init__(self, path: Path, dtype: type) -> None:
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()

    def append(self, row) -> None:
        self.file.write(np.asarray(row, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.file.close()
        self.tmp.replace(self.path)


class _ZstdLines:
    """Append JSON lines to a zstd stream held in memory-bounded chunks on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.writer = zstandard.ZstdCompressor(level=3).stream_writer(self.file, closefd=False)

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(json.dumps(record, sort_keys=True, default=str).encode("utf-8") + b"\n")

    def close(self) -> None:
        self.writer.close()
        self.file.close()
        self.tmp.replace(self.path)


def _read_zstd_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in reader:
            yield json.loads(line)


def _extract(doc: Document, cfg: CleanConfig, fallbacks: dict[str, int]) -> ReadError | None:
    """Replace ``doc.html`` by its main text; a page past the limits becomes a counted error."""
    if doc.html is None:
        return None
    try:
        doc.text = extract_html(doc.html, cfg.extract, fallbacks)
    except (ExtractTimeout, ExtractTooLarge) as exc:
        kind = "extract_timeout" if isinstance(exc, ExtractTimeout) else "extract_too_large"
        return ReadError(kind, doc.file, doc.offset, str(exc), doc.source)
    except Exception as exc:  # noqa: BLE001 - a parser failing on hostile HTML is bad input, not a bug
        return ReadError("extract_failed", doc.file, doc.offset, f"{type(exc).__name__}: {exc}", doc.source)
    finally:
        doc.html = None
    return None


def _clean_document(doc: Document, cfg: CleanConfig, chain: FilterChain) -> str | None:
    """Normalise and filter ``doc`` in place; return the drop reason or None."""
    doc.text = normalize_text(doc.text, cfg.normalize)
    if len(doc.text) < max(cfg.output.min_chars, 1):
        return "empty.too_short"
    return chain(doc)


_CHAINS: dict[str, tuple[FilterChain, MinHasher]] = {}


def _chain_for(cfg: CleanConfig) -> tuple[FilterChain, MinHasher]:
    key = cfg.model_dump_json()
    if key not in _CHAINS:
        _CHAINS.clear()
        _CHAINS[key] = (FilterChain(cfg), MinHasher(cfg.dedup))
    return _CHAINS[key]


def process_input(task: tuple[str, InputFile, str, bool]) -> dict[str, Any]:
    """Phase 1 for one input file (runs in a worker); returns that input's stats dict."""
    cfg_json, inp, work_dir, strict = task
    cfg = CleanConfig.model_validate_json(cfg_json)
    chain, hasher = _chain_for(cfg)
    paths = _InputWork(Path(work_dir), inp.index)
    stats = Stats()
    stats.source(inp.source)
    reader = read_input(inp, source_config(cfg, inp.source), cfg.max_doc_bytes)
    docs = _ZstdLines(paths.docs)
    rejected = _ZstdLines(paths.rejected) if cfg.output.write_rejected else None
    exact = _RawRows(paths.exact, np.uint64)
    sigs = _RawRows(paths.sig, np.uint32)
    try:
        for rec in reader:
            if isinstance(rec, ReadError):
                if strict:
                    raise DataError(f"{rec.kind} in source {rec.source!r}: {rec.where()}: {rec.message} "
                                    "(strict=true stops here; set strict=false to count and skip bad records)")
                stats.error(rec)
                continue
            _process_document(rec, cfg, chain, hasher, stats, reader.fallbacks, strict, docs, rejected, exact, sigs)
    finally:
        for sink in (docs, rejected, exact, sigs):
            if sink is not None:
                sink.close()
    stats.fallbacks.update(reader.fallbacks)
    result = {"index": inp.index, "stats": stats.to_dict()}
    atomic_write_text(paths.done, json.dumps(result, sort_keys=True))
    return result


def _process_document(doc: Document, cfg: CleanConfig, chain: FilterChain, hasher: MinHasher,
                      stats: Stats, fallbacks: dict[str, int], strict: bool, docs: _ZstdLines,
                      rejected: _ZstdLines | None, exact: _RawRows, sigs: _RawRows) -> None:
    err = _extract(doc, cfg, fallbacks)
    if err is not None:
        if strict:
            raise DataError(f"{err.kind} in source {err.source!r}: {err.where()}: {err.message} (strict=true)")
        stats.error(err)
        return
    stats.read(doc.source, len(doc.text))
    reason = _clean_document(doc, cfg, chain)
    if doc.language:
        stats.language(doc.language, "detected")
    if reason is not None:
        stats.drop(doc.source, reason)
        if rejected is not None:
            rejected.write({**doc.record(), "text": doc.text, "reason": reason})
        return
    stats.keep(doc.source, len(doc.text))
    if doc.language:
        stats.language(doc.language, "kept")
    docs.write({**doc.record(), "text": doc.text})
    exact.append(exact_hash(doc.text))
    sigs.append(hasher.signature(doc.text))


# ----------------------------------------------------------------------------- phase 3


class _ShardSink:
    """Writes samples into ``<prefix>-NNNNNN.tar`` files of about ``shard_bytes`` each."""

    def __init__(self, out: Path, prefix: str, shard_bytes: int) -> None:
        self.out, self.prefix, self.shard_bytes = out, prefix, shard_bytes
        self.stack = ExitStack()
        self.writer = None
        self.shard = -1
        self.size = 0
        self.count = 0

    def _open(self) -> None:
        self.stack.close()
        self.shard += 1
        self.writer = self.stack.enter_context(
            atomic_tar_writer(self.out / f"{self.prefix}-{self.shard:06d}.tar"))
        self.size = 0

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None or self.size >= self.shard_bytes:
            self._open()
        text = record.pop("text").encode("utf-8")
        meta = json.dumps(record, sort_keys=True, default=str).encode("utf-8")
        self.writer.write({"__key__": f"{self.count:010d}", "txt": text, "json": meta})
        self.size += len(text) + len(meta) + 1536  # tar headers and padding, roughly
        self.count += 1

    def close(self, at_least_one: bool) -> int:
        if self.writer is None and at_least_one:
            self._open()
        self.stack.close()
        return self.shard + 1


def _write_shards(out: Path, work: Path, inputs: list[InputFile], dropped: dict[int, str],
                  stats: Stats, cfg: CleanConfig) -> dict[str, int]:
    docs = _ShardSink(out, "docs", cfg.output.shard_bytes)
    rejected = _ShardSink(out / "rejected", "rejected", cfg.output.shard_bytes) if cfg.output.write_rejected else None
    global_index = 0
    try:
        for inp in inputs:
            paths = _InputWork(work, inp.index)
            for record in _read_zstd_lines(paths.docs):
                reason = dropped.get(global_index)
                global_index += 1
                if reason is None:
                    docs.write(record)
                    continue
                stats.undo_keep(record["source"], len(record["text"]), reason)
                if record.get("language"):
                    stats.languages[record["language"]]["kept"] -= 1
                if rejected is not None:
                    rejected.write({**record, "reason": reason})
            if rejected is not None:
                for record in _read_zstd_lines(paths.rejected):
                    rejected.write(record)
    finally:
        n_docs = docs.close(at_least_one=True)
        n_rej = rejected.close(at_least_one=False) if rejected is not None else 0
    return {"docs": n_docs, "rejected": n_rej}


# ----------------------------------------------------------------------------- driver


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


def run_inputs(cfg: DataPrepConfig, inputs: list[InputFile], work: Path) -> int:
    """Phase 1 for every input without a completion marker; returns how many were already done."""
    done = {i.index for i in inputs if _InputWork(work, i.index).done.is_file()}
    todo = [i for i in inputs if i.index not in done]
    cfg_json = cfg.data.model_dump_json()
    tasks = [(cfg_json, inp, str(work), cfg.strict) for inp in todo]
    from tqdm import tqdm

    with tqdm(total=len(inputs), initial=len(done), unit="file", desc="clean", disable=None) as bar:
        for _ in build_executor(cfg.executor, cfg.workers, cfg.ray).map_unordered(process_input, tasks):
            bar.update(1)
    return len(done)


def _find_duplicates(cfg: DataPrepConfig, inputs: list[InputFile], work: Path) -> dict[int, str]:
    """Phase 2: in this process, or (executor=ray) as a bucketed shuffle on the cluster; same result."""
    exact = [_InputWork(work, i.index).exact for i in inputs]
    sigs = [_InputWork(work, i.index).sig for i in inputs]
    if cfg.executor != "ray":
        return find_duplicates(exact, sigs, cfg.data.dedup)
    from data_pipeline.ray_dedup import find_duplicates_shuffled

    executor = build_executor(cfg.executor, cfg.workers, cfg.ray)
    return find_duplicates_shuffled(exact, sigs, cfg.data.dedup, executor, work, cfg.ray.dedup_buckets)


def run_clean(cfg: DataPrepConfig) -> dict[str, Any]:
    """Clean ``cfg.input`` (or ``cfg.data.sources``) into ``cfg.output``; return the stats dict."""
    if not cfg.output:
        raise ConfigError("output: required (output=<folder for the clean shards>)")
    out = Path(cfg.output)
    if is_complete(out):
        _check_same_run(out, cfg)
        log.info("%s is already complete; nothing to do", out)
        return json.loads((out / "stats.json").read_text(encoding="utf-8"))
    inputs, skipped = expand_inputs(cfg.data, cfg.input)
    for name in skipped:
        log.info("skipping %s: unrecognised extension (set data.sources[].format to read it)", name)
    work = _prepare_work_dir(out, _fingerprint(cfg, inputs))
    resumed = run_inputs(cfg, inputs, work)
    stats = Stats()
    for inp in inputs:
        stats.merge(Stats.from_dict(json.loads(_InputWork(work, inp.index).done.read_text())["stats"]))
    dropped = _find_duplicates(cfg, inputs, work)
    shards = _write_shards(out, work, inputs, dropped, stats, cfg.data)
    result = stats.to_dict()
    result["inputs"] = {"files": len(inputs), "skipped_files": sorted(skipped), "shards": shards}
    check_invariant(result)
    atomic_write_text(out / "stats.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_provenance(out, cfg)
    atomic_write_text(out / SUCCESS, "")
    shutil.rmtree(work, ignore_errors=True)
    log.info("cleaned %d inputs (%d resumed from a previous run)", len(inputs), resumed)
    return {**result, "resumed_inputs": resumed}
