"""Delimited tables (``.csv``, ``.tsv``); one row is one document, the header names the fields."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from functools import partial

from data_pipeline.clean.readers.base import Reader, Record
from data_pipeline.clean.readers.streams import open_binary

EXTENSIONS = {".csv": "csv", ".tsv": "tsv"}


def read_delimited(reader: Reader, delimiter: str) -> Iterator[Record]:
    csv.field_size_limit(reader.max_doc_bytes)
    with open_binary(reader.inp.path) as stream:
        bad = reader.sniff(stream)
        if bad is not None:
            yield from bad
            return
        text_stream = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
        rows = csv.reader(text_stream, delimiter=delimiter)
        header: list[str] | None = None
        row_no = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                row_no += 1
                yield reader.error("malformed_csv", row_no, f"row {row_no}: {exc}")
                continue
            row_no += 1
            if reader.source.csv_header and header is None:
                header = row
                continue
            record = dict(zip(header, row)) if header else {str(i): v for i, v in enumerate(row)}
            yield reader.from_record(record, row_no)


FORMATS = {"csv": partial(read_delimited, delimiter=","), "tsv": partial(read_delimited, delimiter="\t")}
