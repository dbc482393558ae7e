"""Every input format and its reader: one module per format, listed once here.

A format module defines ``FORMATS`` (format name -> ``Reader -> records`` function) and
``EXTENSIONS`` (file extension -> format name). A new format is a new module added to
``FORMAT_MODULES`` (and its name to ``InputFormat`` in the cleaning config).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from data_pipeline.clean.config import SourceConfig
from data_pipeline.clean.readers import delimited, html, jsonl, parquet, text, warc
from data_pipeline.clean.readers.base import InputFile, Reader, Record
from data_pipeline.clean.readers.streams import COMPRESSIONS

FORMAT_MODULES = (jsonl, text, parquet, delimited, warc, html)

READERS: dict[str, Callable[[Reader], Iterator[Record]]] = {
    name: read for module in FORMAT_MODULES for name, read in module.FORMATS.items()}
FORMAT_BY_EXTENSION: dict[str, str] = {
    ext: name for module in FORMAT_MODULES for ext, name in module.EXTENSIONS.items()}
# extensions of two parts (".warc.wet") win over their last part (".wet" alone is another format)
_COMPOUND_EXTENSIONS = {ext: name for ext, name in FORMAT_BY_EXTENSION.items() if ext.count(".") > 1}


def detect_format(path: str) -> str | None:
    """Format of ``path`` from its extension(s), or None if unrecognised."""
    name = Path(path).name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    for ext, fmt in _COMPOUND_EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return FORMAT_BY_EXTENSION.get(Path(name).suffix)


def read_input(inp: InputFile, source: SourceConfig, max_doc_bytes: int) -> Reader:
    """A reader over one input file (iterate it; ``.fallbacks`` counts decoding fallbacks)."""
    return Reader(inp, source, max_doc_bytes, READERS[inp.format])
