"""What every format reader shares: the input file, and the reader of one file.

A format is a function ``Reader -> Iterator[Document | ReadError]`` in its own module of this
package (listed in :mod:`data_pipeline.clean.readers.registry`); it uses the helpers below to
build documents and errors, sniff binary files, read capped lines or a whole file.

Memory is bounded by one record: lines are read with a length cap (a longer record is skipped
to its end without being held, and counted as ``document_too_large``), parquet is read in
record batches, WARC with FastWARC's streaming iterator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from data_pipeline.clean.config import SourceConfig
from data_pipeline.clean.documents import Document, ReadError
from data_pipeline.clean.readers.streams import (
    STREAM_ERRORS,
    iter_lines,
    open_binary,
    stream_error_kind,
)

Record = Document | ReadError

BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class InputFile:
    """One input file of a run; ``index`` is its place in the run's deterministic order."""

    index: int
    path: str
    name: str
    """Path relative to the source root, used in ids and error messages."""
    source: str
    format: str


def _get_field(record: dict[str, Any], dotted: str) -> Any:
    cur: Any = record
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first_field(record: dict[str, Any], fields: list[str]) -> Any:
    for f in fields:
        value = _get_field(record, f)
        if value is not None:
            return value
    return None


class Reader:
    """Reads one :class:`InputFile` with its format's function; ``fallbacks`` collects decoding
    fallbacks for the stats."""

    def __init__(self, inp: InputFile, source: SourceConfig, max_doc_bytes: int,
                 read_format: Callable[[Reader], Iterator[Record]]) -> None:
        self.inp = inp
        self.source = source
        self.max_doc_bytes = max_doc_bytes
        self.read_format = read_format
        self.fallbacks: dict[str, int] = {}
        self.position = 0
        """Offset of the record being read (reported when the stream itself breaks)."""

    def __iter__(self) -> Iterator[Record]:
        try:
            yield from self.read_format(self)
        except STREAM_ERRORS as exc:
            yield self.error(stream_error_kind(exc), self.position,
                             f"input stream broke after offset {self.position}: {type(exc).__name__}: {exc}")

    def error(self, kind: str, offset: int, message: str) -> ReadError:
        return ReadError(kind, self.inp.name, offset, message, self.inp.source)

    def doc(self, text: str, offset: int, id_: Any = None, url: Any = None,
            metadata: dict[str, Any] | None = None, html: bytes | None = None) -> Document:
        doc_id = str(id_) if id_ not in (None, "") else f"{self.inp.name}:{offset}"
        return Document(id=doc_id, text=text, source=self.inp.source,
                        url=str(url) if url not in (None, "") else None,
                        metadata=metadata or {}, html=html, file=self.inp.name, offset=offset)

    def from_record(self, record: dict[str, Any], offset: int) -> Record:
        """A document from a JSON/parquet/CSV record, using the source's field lists."""
        text = _first_field(record, self.source.text_fields)
        if not isinstance(text, str):
            return self.error("missing_text", offset,
                              f"record {offset} has no text in fields {self.source.text_fields} "
                              "(set data.sources[].text_fields)")
        meta = {f: _get_field(record, f) for f in self.source.metadata_fields}
        return self.doc(text, offset, _first_field(record, self.source.id_fields),
                        _first_field(record, self.source.url_fields), meta)

    def sniff(self, stream: IO[bytes]) -> list[Record] | None:
        """Error records for an empty or binary file, or None when the file looks like text."""
        head = stream.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES] if hasattr(stream, "peek") else b""
        if not head:
            return [self.error("empty_file", 0, "file holds no data")]
        if b"\x00" in head:
            return [self.error("binary_file", 0, "NUL bytes in the first 8 KiB: not a text file")]
        return None

    def per_line(self, parse: Callable[[int, bytes], Record | None]) -> Iterator[Record]:
        """``parse(line number, line)`` for every line of a text file (None: no record); lines
        that are too long and bad files come as errors."""
        with open_binary(self.inp.path) as stream:
            bad = self.sniff(stream)
            if bad is not None:
                yield from bad
                return
            for lineno, line in iter_lines(stream, self.max_doc_bytes):
                self.position = lineno
                if line is None:
                    yield self.error("document_too_large", lineno,
                                     f"line {lineno} is longer than data.max_doc_bytes={self.max_doc_bytes}")
                    continue
                record = parse(lineno, line)
                if record is not None:
                    yield record

    def whole_file(self) -> tuple[bytes | None, list[Record]]:
        """The file's bytes (at most data.max_doc_bytes), or the error records that replace it."""
        with open_binary(self.inp.path) as stream:
            bad = self.sniff(stream)
            if bad is not None:
                return None, bad
            data = stream.read(self.max_doc_bytes + 1)
        if len(data) > self.max_doc_bytes:
            return None, [self.error("document_too_large", 0,
                                     f"file is larger than data.max_doc_bytes={self.max_doc_bytes}")]
        return data, []
