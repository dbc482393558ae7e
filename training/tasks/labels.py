"""The training label set: counts, the table printed at the start of fine-tuning, and the checks
that catch a typo in a training label before it silently becomes a class of its own.

A typo in a dev or test label is refused (it never occurs in training); a typo in a *training*
label is indistinguishable from a real class, so it is only warned about:

- **rare**: seen fewer than :data:`RARE_COUNT` times while the most frequent label is seen at
  least :data:`RARE_RATIO` times as often (``Sports`` once beside ``sports`` 800 times). Relative
  to the data so that a small set, where every label is seen a few times, gives no warnings;
- **case only**: two labels that are equal ignoring case (``Sports`` / ``sports``);
- **BIO tags** (token classification, :func:`bio_warnings`): an entity type that is rare over
  its ``B-`` and ``I-`` tags together (``B-LCO``), and a type with ``I-`` but never ``B-`` tags
  in data that otherwise starts entities with ``B-``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

RARE_COUNT = 5
"""A label seen fewer times than this may be a typo ..."""
RARE_RATIO = 100
"""... when the most frequent label is seen at least this many times as often."""


def is_rare(count: int, most_common: int) -> bool:
    """Whether a label seen ``count`` times is suspiciously rare (see the module docstring)."""
    return count < RARE_COUNT and most_common >= RARE_RATIO * count


def rare_labels(counts: Counter[str], what: str = "label") -> list[str]:
    """One warning per rare label of ``counts``."""
    if not counts:
        return []
    top_name, top = counts.most_common(1)[0]
    return [f"{what} {name!r} is seen only {n} time{'s' * (n != 1)} (the most frequent, {top_name!r}, "
            f"{top} times): a typo becomes a class of its own; fix it, or ignore this if the {what} is real"
            for name, n in sorted(counts.items(), key=lambda x: (x[1], x[0])) if is_rare(n, top)]


def case_collisions(names: Iterable[str], counts: Counter[str], what: str = "labels") -> list[str]:
    """One warning per group of names that are equal ignoring case."""
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault(name.casefold(), []).append(name)
    return [f"{what} {' and '.join(f'{n!r} ({counts[n]})' for n in group)} differ only by case and are "
            "trained as different classes; make them one spelling"
            for group in groups.values() if len(group) > 1]


def label_warnings(counts: Counter[str]) -> list[str]:
    """Rare labels and labels that differ only by case."""
    return rare_labels(counts) + case_collisions(counts, counts)


def bio_type(tag: str) -> tuple[str, str] | None:
    """(prefix, entity type) of a ``B-``/``I-``/``E-``/``S-`` tag; None for ``O`` and other tags."""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return None


def bio_warnings(counts: Counter[str]) -> list[str]:
    """Label warnings of BIO/IOB tags: rare entity types (over all their tags), case-only
    differences of tags or types, and ``I-X`` without any ``B-X`` where other types use ``B-``."""
    types: Counter[str] = Counter()
    prefixes: dict[str, Counter[str]] = {}
    plain: Counter[str] = Counter()
    for tag, n in counts.items():
        parsed = bio_type(tag)
        if parsed is None:
            plain[tag] += n
        else:
            types[parsed[1]] += n
            prefixes.setdefault(parsed[1], Counter())[parsed[0]] += n
    top = max(counts.values(), default=0)
    warnings = []
    for name, n in sorted(types.items(), key=lambda x: (x[1], x[0])):
        if is_rare(n, top):
            tags = ", ".join(f"{p}-{name} {c}" for p, c in sorted(prefixes[name].items()))
            warnings.append(f"entity type {name!r} is tagged on only {n} token{'s' * (n != 1)} ({tags}; the most "
                            f"frequent tag is seen {top} times): a typo becomes a type of its own; fix "
                            "it, or ignore this if the type is real")
    warnings += rare_labels(plain, "tag")
    warnings += case_collisions(types, types, "entity types") + case_collisions(plain, plain, "tags")
    if any(p.get("B") for p in prefixes.values()):
        for name in sorted(types):
            if prefixes[name].get("I") and not prefixes[name].get("B"):
                warnings.append(
                    f"I-{name} occurs {prefixes[name]['I']} times but B-{name} never, while other types "
                    f"start with B- tags: with BIO tags every entity starts with B-{name} (a typo in "
                    "the tags, or IOB1 data that mixes conventions)")
    return warnings


def label_table(counts: Counter[str], order: list[str], unit: str, source: str) -> str:
    """The label set with counts and shares, one label per line, in label-id order."""
    total = sum(counts.values())
    width = max((len(n) for n in order), default=0)
    lines = [f"training labels ({source}): {len(order)} label{'s' * (len(order) != 1)} over {total} {unit}"]
    lines += [f"  {i:>3}  {name:<{width}}  {counts[name]:>9}  {100 * counts[name] / max(total, 1):5.1f}%"
              for i, name in enumerate(order)]
    return "\n".join(lines)
