"""The input files of a run: sources expanded into files in a fixed order, each with its format."""

from __future__ import annotations

import glob
from pathlib import Path

from crucible.errors import DataError
from data_pipeline.clean.config import CleanConfig, SourceConfig
from data_pipeline.clean.readers.base import InputFile
from data_pipeline.clean.readers.registry import detect_format


def _resolve(base: str | None, path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base:
        p = Path(base).expanduser() / p
    return str(p)


def list_source_files(source: SourceConfig, base: str | None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(path, name, format) of every readable file of a source, sorted; plus ``source:name`` of skipped files."""
    root = _resolve(base, source.path)
    if Path(root).is_dir():
        candidates = sorted(str(p) for p in Path(root).rglob("*") if p.is_file())
        rel_to = Path(root)
    else:
        candidates = sorted(glob.glob(root, recursive=True)) if glob.has_magic(root) else (
            [root] if Path(root).is_file() else [])
        candidates = [c for c in candidates if Path(c).is_file()]
        rel_to = Path(root).parent if not glob.has_magic(root) else Path(_glob_base(root))
    if not candidates:
        raise DataError(f"source {source.name!r}: no input files at {root} "
                        "(set input= or data.sources[].path to an existing file, folder or glob)")
    found, skipped = [], []
    for path in candidates:
        fmt = source.format if source.format != "auto" else detect_format(path)
        if fmt is None:
            skipped.append(f"{source.name}:{Path(path).relative_to(rel_to)}")
            continue
        found.append((path, str(Path(path).relative_to(rel_to)), fmt))
    if not found:
        raise DataError(f"source {source.name!r}: none of the {len(skipped)} files at {root} has a recognised "
                        f"extension (e.g. {skipped[0].split(':', 1)[1]}); set the source's format "
                        "(data.sources[].format or data.default_format)")
    return found, skipped


def _glob_base(pattern: str) -> str:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else "."


def expand_inputs(cfg: CleanConfig, input_path: str | None) -> tuple[list[InputFile], list[str]]:
    """Every input file of a run in its fixed order (sources in config order, files sorted)."""
    sources = cfg.sources or [SourceConfig(name=cfg.default_source, path=input_path or "",
                                           format=cfg.default_format)]
    if not cfg.sources and not input_path:
        raise DataError("no input: set input=<file, folder or glob> or list data.sources")
    files: list[InputFile] = []
    skipped: list[str] = []
    for source in sources:
        found, skip = list_source_files(source, input_path if cfg.sources else None)
        skipped += skip
        for path, name, fmt in found:
            files.append(InputFile(len(files), path, name, source.name, fmt))
    return files, skipped


def source_config(cfg: CleanConfig, name: str) -> SourceConfig:
    for s in cfg.sources:
        if s.name == name:
            return s
    return SourceConfig(name=name, path="")
