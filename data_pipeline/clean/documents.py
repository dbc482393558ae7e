"""Documents flowing through the cleaning stage, and the errors readers report instead of them.

Readers yield :class:`Document` (one input record that became a document) or
:class:`ReadError` (one input record, or a whole unreadable file, that could not). Both count
as *read*; this is what makes ``read = kept + dropped + errors`` hold in ``stats.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document: ``text`` is plain text; ``html`` is set instead while extraction is pending."""

    id: str
    text: str
    source: str
    url: str | None = None
    language: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    html: bytes | None = None
    file: str = ""
    offset: int = 0
    """Where the record starts: byte offset in the (decompressed) input, or line number for line formats."""

    def record(self) -> dict[str, Any]:
        """The JSON sidecar written next to the text in a clean shard."""
        return {"id": self.id, "source": self.source, "url": self.url,
                "language": self.language, "metadata": self.metadata}


@dataclass
class ReadError:
    """A record (or a whole file) that could not be read; counted under ``errors`` by ``kind``."""

    kind: str
    file: str
    offset: int
    message: str
    source: str = ""

    def where(self) -> str:
        return f"{self.file} at offset {self.offset}"
