"""Plain text: a whole file is one document (``text``), or every non-empty line is (``lines``)."""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.clean.readers.base import Reader, Record
from data_pipeline.clean.readers.streams import decode_text

EXTENSIONS = {".txt": "text"}


def read_text_file(reader: Reader) -> Iterator[Record]:
    data, errors = reader.whole_file()
    yield from errors
    if data is not None:
        yield reader.doc(decode_text(data, reader.fallbacks), 0, id_=reader.inp.name)


def read_lines(reader: Reader) -> Iterator[Record]:
    def parse(lineno: int, line: bytes) -> Record | None:
        text = decode_text(line, reader.fallbacks).strip()
        return reader.doc(text, lineno) if text else None

    return reader.per_line(parse)


FORMATS = {"text": read_text_file, "lines": read_lines}
