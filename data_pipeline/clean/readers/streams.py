"""Byte streams of input files: transparent decompression, length-capped lines, text decoding.

Text decoding fallback (documented, never a crash): UTF-8; if that fails, Windows-1252 (the
usual legacy web encoding); if that fails too, UTF-8 with U+FFFD replacement characters. Each
fallback is counted in ``stats.json`` under ``fallbacks``; ftfy then repairs mojibake.
"""

from __future__ import annotations

import bz2
import gzip
import io
import zlib
from collections.abc import Iterator
from typing import IO

COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2")


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


def stream_error_kind(exc: BaseException) -> str:
    """``truncated_input`` or ``corrupt_input`` for an exception in :data:`STREAM_ERRORS`."""
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

