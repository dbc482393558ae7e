"""Streaming readers: every supported input format -> :class:`Document` or :class:`ReadError`.

Memory is bounded by one record: lines are read with a length cap (a longer record is skipped
to its end without being held, and counted as ``document_too_large``), parquet is read in
record batches, WARC with FastWARC's streaming iterator.

Text decoding fallback (documented, never a crash): UTF-8; if that fails, Windows-1252 (the
usual legacy web encoding); if that fails too, UTF-8 with U+FFFD replacement characters. Each
fallback is counted in ``stats.json`` under ``fallbacks``; ftfy then repairs mojibake.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from crucible.errors import DataError
from data_pipeline.config import CleanConfig, SourceConfig
from data_pipeline.documents import Document, ReadError

Record = Document | ReadError

COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2")
FORMAT_BY_EXTENSION = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".txt": "text",
    ".parquet": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".warc": "warc", ".wet": "wet", ".arc": "warc",
    ".html": "html", ".htm": "html",
}
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


def detect_format(path: str) -> str | None:
    """Format of ``path`` from its extension(s), or None if unrecognised."""
    name = Path(path).name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    if name.endswith(".warc.wet"):
        return "wet"
    if name.endswith(".warc.wat"):
        return None
    return FORMAT_BY_EXTENSION.get(Path(name).suffix)


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


# --------------------------------------------------------------------------- decoding


def decode_text(data: bytes, fallbacks: dict[str, int] | None = None) -> str:
    """Bytes -> str with the documented fallback chain (utf-8, cp1252, utf-8 with replacement)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")
        kind = "decoded_cp1252"
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        kind = "decoded_utf8_replace"
    if fallbacks is not None:
        fallbacks[kind] = fallbacks.get(kind, 0) + 1
    return text


def open_binary(path: str) -> IO[bytes]:
    """Open ``path`` for reading, decompressing .gz/.zst/.bz2 as a stream."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".bz2"):
        return bz2.open(path, "rb")
    if lower.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdRaw(path))
    return open(path, "rb")


class _ZstdRaw(io.RawIOBase):
    """Streaming zstd decompression that, unlike ``stream_reader``, notices a truncated frame."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._zstd = zstandard
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its frame (truncated file)")
                return 0
            self._feed(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            self._in_frame = True
            try:
                self._pending += self._obj.decompress(chunk)
            except self._zstd.ZstdError as exc:
                raise ValueError(f"corrupt zstd data: {exc}") from None
            if not self._obj.eof:
                return
            self._in_frame = False
            chunk = self._obj.unused_data
            self._obj = self._zstd.ZstdDecompressor().decompressobj()

    def close(self) -> None:
        self._file.close()
        super().close()


STREAM_ERRORS = (EOFError, OSError, zlib.error, ValueError)


def _stream_error_kind(exc: BaseException) -> str:
    return "truncated_input" if isinstance(exc, EOFError) or "ended" in str(exc) or "truncat" in str(exc).lower() \
        else "corrupt_input"


def iter_lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) with lines longer than ``max_bytes`` skipped without holding them (None)."""
    lineno = 0
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
        else:
            yield lineno, line


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
    """Reads one :class:`InputFile`; ``fallbacks`` collects decoding fallbacks for the stats."""

    def __init__(self, inp: InputFile, source: SourceConfig, max_doc_bytes: int) -> None:
        self.inp = inp
        self.source = source
        self.max_doc_bytes = max_doc_bytes
        self.fallbacks: dict[str, int] = {}
        self.position = 0
        """Offset of the record being read (reported when the stream itself breaks)."""

    def error(self, kind: str, offset: int, message: str) -> ReadError:
        return ReadError(kind, self.inp.name, offset, message, self.inp.source)

    def doc(self, text: str, offset: int, id_: Any = None, url: Any = None,
            metadata: dict[str, Any] | None = None, html: bytes | None = None) -> Document:
        doc_id = str(id_) if id_ not in (None, "") else f"{self.inp.name}:{offset}"
        return Document(id=doc_id, text=text, source=self.inp.source,
                        url=str(url) if url not in (None, "") else None,
                        metadata=metadata or {}, html=html, file=self.inp.name, offset=offset)

    def __iter__(self) -> Iterator[Record]:
        readers: dict[str, Callable[[], Iterator[Record]]] = {
            "jsonl": self._jsonl, "text": self._text_file, "lines": self._lines,
            "parquet": self._parquet, "csv": self._csv, "tsv": self._csv,
            "warc": self._warc, "wet": self._warc, "html": self._html,
        }
        try:
            yield from readers[self.inp.format]()
        except STREAM_ERRORS as exc:
            yield self.error(_stream_error_kind(exc), self.position,
                             f"input stream broke after offset {self.position}: {type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- line formats

    def _sniffed(self, stream: IO[bytes]) -> Iterator[Record] | None:
        """Error records for an empty or binary file, or None when the file looks like text."""
        head = stream.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES] if hasattr(stream, "peek") else b""
        if not head:
            return iter([self.error("empty_file", 0, "file holds no data")])
        if b"\x00" in head:
            return iter([self.error("binary_file", 0, "NUL bytes in the first 8 KiB: not a text file")])
        return None


    def _iter_line_stream(self) -> Iterator[tuple[int, bytes | None] | ReadError]:
        with open_binary(self.inp.path) as stream:
            bad = self._sniffed(stream)
            if bad is not None:
                yield from bad
                return
            for lineno, line in iter_lines(stream, self.max_doc_bytes):
                self.position = lineno
                if line is None:
                    yield self.error("document_too_large", lineno,
                                     f"line {lineno} is longer than data.max_doc_bytes={self.max_doc_bytes}")
                else:
                    yield lineno, line

    def _jsonl(self) -> Iterator[Record]:
        for item in self._iter_line_stream():
            if isinstance(item, ReadError):
                yield item
                continue
            lineno, line = item
            if not line.strip():
                continue
            try:
                record = json.loads(decode_text(line, self.fallbacks))
            except json.JSONDecodeError as exc:
                yield self.error("malformed_json", lineno, f"line {lineno}: {exc}")
                continue
            if not isinstance(record, dict):
                yield self.error("malformed_json", lineno, f"line {lineno}: not a JSON object")
                continue
            yield self._from_record(record, lineno)

    def _from_record(self, record: dict[str, Any], offset: int) -> Record:
        text = _first_field(record, self.source.text_fields)
        if not isinstance(text, str):
            return self.error("missing_text", offset,
                              f"record {offset} has no text in fields {self.source.text_fields} "
                              "(set data.sources[].text_fields)")
        meta = {f: _get_field(record, f) for f in self.source.metadata_fields}
        return self.doc(text, offset, _first_field(record, self.source.id_fields),
                        _first_field(record, self.source.url_fields), meta)

    def _lines(self) -> Iterator[Record]:
        for item in self._iter_line_stream():
            if isinstance(item, ReadError):
                yield item
                continue
            lineno, line = item
            text = decode_text(line, self.fallbacks).strip()
            if text:
                yield self.doc(text, lineno)

    def _whole_file(self) -> tuple[bytes | None, list[Record]]:
        """The file's bytes (at most data.max_doc_bytes), or the error records that replace it."""
        with open_binary(self.inp.path) as stream:
            bad = self._sniffed(stream)
            if bad is not None:
                return None, list(bad)
            data = stream.read(self.max_doc_bytes + 1)
        if len(data) > self.max_doc_bytes:
            return None, [self.error("document_too_large", 0,
                                     f"file is larger than data.max_doc_bytes={self.max_doc_bytes}")]
        return data, []

    def _text_file(self) -> Iterator[Record]:
        data, errors = self._whole_file()
        yield from errors
        if data is not None:
            yield self.doc(decode_text(data, self.fallbacks), 0, id_=self.inp.name)

    def _html(self) -> Iterator[Record]:
        data, errors = self._whole_file()
        yield from errors
        if data is not None:
            yield self.doc("", 0, id_=self.inp.name, html=data)

    # ---------------------------------------------------------------- tables

    def _parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(self.inp.path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds on a corrupt file
            yield self.error("corrupt_input", 0, f"not a readable parquet file: {exc}")
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield self._from_record(record, row)
                row += 1

    def _csv(self) -> Iterator[Record]:
        delimiter = "\t" if self.inp.format == "tsv" else ","
        csv.field_size_limit(self.max_doc_bytes)
        with open_binary(self.inp.path) as stream:
            bad = self._sniffed(stream)
            if bad is not None:
                yield from bad
                return
            text_stream = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
            reader = csv.reader(text_stream, delimiter=delimiter)
            header: list[str] | None = None
            row_no = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    row_no += 1
                    yield self.error("malformed_csv", row_no, f"row {row_no}: {exc}")
                    continue
                row_no += 1
                if self.source.csv_header and header is None:
                    header = row
                    continue
                record = dict(zip(header, row)) if header else {str(i): v for i, v in enumerate(row)}
                yield self._from_record(record, row_no)

    # ---------------------------------------------------------------- web archives

    def _warc(self) -> Iterator[Record]:
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        is_wet = self.inp.format == "wet"
        wanted = WarcRecordType.conversion if is_wet else WarcRecordType.response
        with open(self.inp.path, "rb") as raw:
            if not raw.read(1):
                yield self.error("empty_file", 0, "file holds no data")
                return
            raw.seek(0)
            try:
                yield from self._warc_records(ArchiveIterator(raw, record_types=wanted, parse_http=not is_wet), is_wet)
            except (OSError, ValueError) as exc:
                yield self.error("malformed_warc", self.position, f"after byte {self.position}: {exc}")
                return

    def _warc_records(self, records, is_wet: bool) -> Iterator[Record]:
        for record in records:
            offset = record.stream_pos
            self.position = offset
            url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
            rec_id = record.record_id or f"{self.inp.name}:{offset}"
            if record.content_length > self.max_doc_bytes:
                yield self.error("document_too_large", offset, f"WARC record at byte {offset} is "
                                 f"{record.content_length} bytes (> data.max_doc_bytes)")
                continue
            try:
                payload = record.reader.read()
            except Exception as exc:  # noqa: BLE001 - FastWARC raises plain exceptions on corrupt payloads
                yield self.error("malformed_warc", offset, f"record at byte {offset}: {exc}")
                continue
            if is_wet:
                yield self.doc(decode_text(payload, self.fallbacks), offset, rec_id, url)
                continue
            if not record.http_headers:
                yield self.error("malformed_warc", offset, f"record at byte {offset}: no HTTP headers")
                continue
            ctype = (record.http_content_type or "").lower()
            if "html" not in ctype:
                # images, PDFs, robots.txt: not documents of this stage (counted, not read)
                self.fallbacks["warc_non_html_skipped"] = self.fallbacks.get("warc_non_html_skipped", 0) + 1
                continue
            meta = {"http_status": record.http_headers.status_code}
            yield self.doc("", offset, rec_id, url, meta, html=payload)


def read_input(inp: InputFile, source: SourceConfig, max_doc_bytes: int) -> Reader:
    """A reader over one input file (iterate it; ``.fallbacks`` counts decoding fallbacks)."""
    return Reader(inp, source, max_doc_bytes)


def source_config(cfg: CleanConfig, name: str) -> SourceConfig:
    for s in cfg.sources:
        if s.name == name:
            return s
    return SourceConfig(name=name, path="")
