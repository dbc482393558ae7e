"""Web archives: WARC responses (HTML, extracted later) and WET conversions (plain text)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from data_pipeline.clean.readers.base import Reader, Record
from data_pipeline.clean.readers.streams import decode_text

EXTENSIONS = {".warc": "warc", ".arc": "warc", ".wet": "wet", ".warc.wet": "wet"}


def read_warc(reader: Reader) -> Iterator[Record]:
    return _read_archive(reader, is_wet=False)


def read_wet(reader: Reader) -> Iterator[Record]:
    return _read_archive(reader, is_wet=True)


def _read_archive(reader: Reader, is_wet: bool) -> Iterator[Record]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    wanted = WarcRecordType.conversion if is_wet else WarcRecordType.response
    with open(reader.inp.path, "rb") as raw:
        if not raw.read(1):
            yield reader.error("empty_file", 0, "file holds no data")
            return
        raw.seek(0)
        try:
            yield from _records(reader, ArchiveIterator(raw, record_types=wanted, parse_http=not is_wet), is_wet)
        except (OSError, ValueError) as exc:
            yield reader.error("malformed_warc", reader.position, f"after byte {reader.position}: {exc}")
            return


def _records(reader: Reader, records: Any, is_wet: bool) -> Iterator[Record]:
    for record in records:
        offset = record.stream_pos
        reader.position = offset
        url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
        rec_id = record.record_id or f"{reader.inp.name}:{offset}"
        if record.content_length > reader.max_doc_bytes:
            yield reader.error("document_too_large", offset, f"WARC record at byte {offset} is "
                               f"{record.content_length} bytes (> data.max_doc_bytes)")
            continue
        try:
            payload = record.reader.read()
        except Exception as exc:  # noqa: BLE001 - FastWARC raises plain exceptions on corrupt payloads
            yield reader.error("malformed_warc", offset, f"record at byte {offset}: {exc}")
            continue
        if is_wet:
            yield reader.doc(decode_text(payload, reader.fallbacks), offset, rec_id, url)
            continue
        if not record.http_headers:
            yield reader.error("malformed_warc", offset, f"record at byte {offset}: no HTTP headers")
            continue
        ctype = (record.http_content_type or "").lower()
        if "html" not in ctype:
            # images, PDFs, robots.txt: not documents of this stage (counted, not read)
            reader.fallbacks["warc_non_html_skipped"] = reader.fallbacks.get("warc_non_html_skipped", 0) + 1
            continue
        meta = {"http_status": record.http_headers.status_code}
        yield reader.doc("", offset, rec_id, url, meta, html=payload)


FORMATS = {"warc": read_warc, "wet": read_wet}
