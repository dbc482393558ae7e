"""A saved web page (``.html``): one document whose text is extracted later (clean.extract)."""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.clean.readers.base import Reader, Record

EXTENSIONS = {".html": "html", ".htm": "html"}


def read_html(reader: Reader) -> Iterator[Record]:
    data, errors = reader.whole_file()
    yield from errors
    if data is not None:
        yield reader.doc("", 0, id_=reader.inp.name, html=data)


FORMATS = {"html": read_html}
