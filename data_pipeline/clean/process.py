"""Phase 1 of cleaning, for one input file in a worker: read -> extract -> normalise -> filters
-> PII.

Kept documents, their exact hashes and MinHash signatures and the input's stats go to the
input's files in ``_work/`` (:mod:`data_pipeline.clean.work`); the completion marker
``NNNNNN.done.json`` is written last, so a rerun skips exactly the inputs that finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crucible.errors import DataError
from crucible.fileio import atomic_write_text
from data_pipeline.clean.config import CleanConfig
from data_pipeline.clean.dedup import MinHasher, exact_hash
from data_pipeline.clean.documents import Document, ReadError
from data_pipeline.clean.extract import ExtractTimeout, ExtractTooLarge, extract_html
from data_pipeline.clean.filters.chain import FilterChain
from data_pipeline.clean.normalize import normalize_text
from data_pipeline.clean.readers.base import InputFile
from data_pipeline.clean.readers.inputs import source_config
from data_pipeline.clean.readers.registry import read_input
from data_pipeline.clean.stats import Stats
from data_pipeline.clean.work import InputWork, row_file, zstd_json_lines


def extract_document(doc: Document, cfg: CleanConfig, fallbacks: dict[str, int]) -> ReadError | None:
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


def clean_document(doc: Document, cfg: CleanConfig, chain: FilterChain) -> str | None:
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


@dataclass
class InputOutputs:
    """Writers of one input's ``_work`` files."""

    docs: Callable[[dict[str, Any]], None]
    rejected: Callable[[dict[str, Any]], None] | None
    exact: Callable[[Any], None]
    signatures: Callable[[Any], None]


@contextmanager
def open_outputs(paths: InputWork, write_rejected: bool) -> Iterator[InputOutputs]:
    with ExitStack() as stack:
        yield InputOutputs(
            docs=stack.enter_context(zstd_json_lines(paths.docs)),
            rejected=stack.enter_context(zstd_json_lines(paths.rejected)) if write_rejected else None,
            exact=stack.enter_context(row_file(paths.exact, np.uint64)),
            signatures=stack.enter_context(row_file(paths.sig, np.uint32)),
        )


def process_input(task: tuple[str, InputFile, str, bool]) -> dict[str, Any]:
    """Phase 1 for one input file (runs in a worker); returns that input's stats dict."""
    cfg_json, inp, work_dir, strict = task
    cfg = CleanConfig.model_validate_json(cfg_json)
    chain, hasher = _chain_for(cfg)
    paths = InputWork(Path(work_dir), inp.index)
    stats = Stats()
    stats.source(inp.source)
    reader = read_input(inp, source_config(cfg, inp.source), cfg.max_doc_bytes)
    with open_outputs(paths, cfg.output.write_rejected) as out:
        for rec in reader:
            if isinstance(rec, ReadError):
                if strict:
                    raise DataError(f"{rec.kind} in source {rec.source!r}: {rec.where()}: {rec.message} "
                                    "(strict=true stops here; set strict=false to count and skip bad records)")
                stats.error(rec)
                continue
            process_document(rec, cfg, chain, hasher, stats, reader.fallbacks, strict, out)
    stats.fallbacks.update(reader.fallbacks)
    result = {"index": inp.index, "stats": stats.to_dict()}
    atomic_write_text(paths.done, json.dumps(result, sort_keys=True))
    return result


def process_document(doc: Document, cfg: CleanConfig, chain: FilterChain, hasher: MinHasher,
                     stats: Stats, fallbacks: dict[str, int], strict: bool, out: InputOutputs) -> None:
    err = extract_document(doc, cfg, fallbacks)
    if err is not None:
        if strict:
            raise DataError(f"{err.kind} in source {err.source!r}: {err.where()}: {err.message} (strict=true)")
        stats.error(err)
        return
    stats.read(doc.source, len(doc.text))
    reason = clean_document(doc, cfg, chain)
    if doc.language:
        stats.language(doc.language, "detected")
    if reason is not None:
        stats.drop(doc.source, reason)
        if out.rejected is not None:
            out.rejected({**doc.record(), "text": doc.text, "reason": reason})
        return
    stats.keep(doc.source, len(doc.text))
    if doc.language:
        stats.language(doc.language, "kept")
    out.docs({**doc.record(), "text": doc.text})
    out.exact(exact_hash(doc.text))
    out.signatures(hasher.signature(doc.text))
