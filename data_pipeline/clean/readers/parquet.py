"""Parquet tables, read in record batches; one row is one document."""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.clean.readers.base import Reader, Record

EXTENSIONS = {".parquet": "parquet"}


def read_parquet(reader: Reader) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(reader.inp.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds on a corrupt file
        yield reader.error("corrupt_input", 0, f"not a readable parquet file: {exc}")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield reader.from_record(record, row)
            row += 1


FORMATS = {"parquet": read_parquet}
