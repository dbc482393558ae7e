"""JSON lines: one JSON object per line (``.jsonl``, ``.json``, ``.ndjson``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from data_pipeline.clean.readers.base import Reader, Record
from data_pipeline.clean.readers.streams import decode_text

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def read_jsonl(reader: Reader) -> Iterator[Record]:
    def parse(lineno: int, line: bytes) -> Record | None:
        if not line.strip():
            return None
        try:
            record = json.loads(decode_text(line, reader.fallbacks))
        except json.JSONDecodeError as exc:
            return reader.error("malformed_json", lineno, f"line {lineno}: {exc}")
        if not isinstance(record, dict):
            return reader.error("malformed_json", lineno, f"line {lineno}: not a JSON object")
        return reader.from_record(record, lineno)

    return reader.per_line(parse)


FORMATS = {"jsonl": read_jsonl}
