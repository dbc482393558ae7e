"""Accounting of a cleaning run: every document read is kept, dropped with a reason, or an error.

Counts are kept per input file while it is processed (:class:`Stats`), written beside that
input's results, and merged in input order into ``stats.json``. The invariant
``documents_read == documents_kept + sum(dropped) + sum(errors)`` holds for the whole run, for
each source and for each input, and :func:`check_invariant` verifies it before a run is marked
complete.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.clean.documents import ReadError

MAX_EXAMPLES_PER_KIND = 20


@dataclass
class SourceStats:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    chars_in: int = 0
    chars_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "errors": dict(sorted(self.errors.items())), "chars_in": self.chars_in,
                "chars_out": self.chars_out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceStats:
        return cls(d["read"], d["kept"], Counter(d["dropped"]), Counter(d["errors"]),
                   d["chars_in"], d["chars_out"])

    def merge(self, other: SourceStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.errors.update(other.errors)
        self.chars_in += other.chars_in
        self.chars_out += other.chars_out


@dataclass
class Stats:
    """Counters of one input file, or (merged) of a whole run."""

    sources: dict[str, SourceStats] = field(default_factory=dict)
    languages: dict[str, Counter] = field(default_factory=dict)
    fallbacks: Counter = field(default_factory=Counter)
    error_examples: list[dict[str, Any]] = field(default_factory=list)

    def source(self, name: str) -> SourceStats:
        if name not in self.sources:
            self.sources[name] = SourceStats()
        return self.sources[name]

    def read(self, source: str, chars: int = 0) -> None:
        s = self.source(source)
        s.read += 1
        s.chars_in += chars

    def error(self, err: ReadError) -> None:
        s = self.source(err.source)
        s.read += 1
        s.errors[err.kind] += 1
        self._example({"kind": err.kind, "file": err.file, "offset": err.offset, "message": err.message[:300]})

    def _example(self, example: dict[str, Any]) -> None:
        """Keep the first few errors of every kind (file and offset), so rare kinds are not crowded out."""
        if sum(e["kind"] == example["kind"] for e in self.error_examples) < MAX_EXAMPLES_PER_KIND:
            self.error_examples.append(example)

    def drop(self, source: str, reason: str) -> None:
        self.source(source).dropped[reason] += 1

    def keep(self, source: str, chars: int) -> None:
        s = self.source(source)
        s.kept += 1
        s.chars_out += chars

    def undo_keep(self, source: str, chars: int, reason: str, language: str | None = None) -> None:
        """A kept document turned out to be a duplicate: move it from kept to dropped."""
        s = self.source(source)
        s.kept -= 1
        s.chars_out -= chars
        s.dropped[reason] += 1
        if language:
            self.languages[language]["kept"] -= 1

    def language(self, lang: str, what: str) -> None:
        self.languages.setdefault(lang, Counter())[what] += 1

    def merge(self, other: Stats) -> None:
        for name, s in other.sources.items():
            self.source(name).merge(s)
        for lang, c in other.languages.items():
            self.languages.setdefault(lang, Counter()).update(c)
        self.fallbacks.update(other.fallbacks)
        for example in other.error_examples:
            self._example(example)

    def total(self) -> SourceStats:
        t = SourceStats()
        for s in self.sources.values():
            t.merge(s)
        return t

    def to_dict(self) -> dict[str, Any]:
        t = self.total()
        return {
            "documents_read": t.read,
            "documents_kept": t.kept,
            "dropped": dict(sorted(t.dropped.items())),
            "errors": dict(sorted(t.errors.items())),
            "chars_in": t.chars_in,
            "chars_out": t.chars_out,
            "per_source": {k: v.to_dict() for k, v in sorted(self.sources.items())},
            "per_language": {k: dict(sorted(v.items())) for k, v in sorted(self.languages.items())},
            "fallbacks": dict(sorted(self.fallbacks.items())),
            "error_examples": self.error_examples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(
            sources={k: SourceStats.from_dict(v) for k, v in d["per_source"].items()},
            languages={k: Counter(v) for k, v in d["per_language"].items()},
            fallbacks=Counter(d["fallbacks"]),
            error_examples=list(d["error_examples"]),
        )


def invariant_holds(d: dict[str, Any]) -> bool:
    """``read == kept + sum(dropped) + sum(errors)``, for a stats dict or one of its sources."""
    return d["read" if "read" in d else "documents_read"] == (
        d["kept" if "kept" in d else "documents_kept"]
        + sum(d["dropped"].values()) + sum(d["errors"].values()))


def check_invariant(d: dict[str, Any]) -> None:
    """Raise if any document is unaccounted for (a bug, never a user error)."""
    parts = [("total", d)] + [(f"source {k}", v) for k, v in d["per_source"].items()]
    for name, part in parts:
        if not invariant_holds(part):
            raise RuntimeError(f"stats accounting broken for {name}: {part}")
