"""Typed configuration: YAML recipes + dotted overrides -> validated pydantic sections.

Every component owns one section class (a :class:`Section`), defined next to the code that
uses it: ``data_pipeline`` owns ``data``/``tokenizer``, ``model`` owns ``model``, ``training``
owns ``optim``/``schedule``/``train``/``checkpoint``/``log``/``task``. A stage's root config
is a :class:`Section` whose fields are those sections (plus a few top-level keys such as
``input``/``output``).

Loading is done by libraries, not by hand: OmegaConf reads the YAML (safe loader) and merges
the dotted ``section.key=value`` overrides; pydantic validates the merged tree (unknown keys,
types, ranges, allowed values, cross-field rules) and reports every problem with the dotted key,
the file and what is allowed.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from crucible.errors import ConfigError
from crucible.fileio import atomic_write_text

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base class of every config section: unknown keys are errors, field docstrings are help."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        coerce_numbers_to_str=True,
        validate_default=True,
    )
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    """Root config from :func:`load_config`: dotted key -> where its value was set."""

    def __eq__(self, other: object) -> bool:
        """Configs with equal values are equal, wherever the values were set."""
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__


COMMAND_LINE = "the command line"
DEFAULT = "the default"


def value_origin(cfg: Section, key: str) -> str | None:
    """Where the value of dotted ``key`` of a root config came from: :data:`COMMAND_LINE`, the
    YAML file's path or :data:`DEFAULT`; None for a config not made by :func:`load_config`."""
    if not cfg._origins:
        return None
    return cfg._origins.get(key, DEFAULT)


def describe_value(cfg: Section, key: str) -> str:
    """``key=value`` with where the value came from, for messages about values that conflict:
    ``train.max_steps=2 (from the command line)``."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    origin = value_origin(cfg, key)
    return f"{key}={value}" + (f" (from {origin})" if origin else "")


def _parse_overrides(overrides: list[str]) -> Any:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(
            f"override {bad[0]!r} is not of the form section.key=value "
            "(e.g. train.max_steps=100)"
        )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse overrides {overrides}: {exc}") from None


def _section_at(root_cls: type[Section], loc: tuple) -> type[BaseModel] | None:
    """The section class that holds the key at ``loc`` (for listing its allowed keys)."""
    cls: Any = root_cls
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = _unwrap(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]``/``list[X]``/``dict[str, X]`` -> ``X`` when X is a section."""
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _field_keys(cls: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key of a config class (sections and their fields)."""
    keys: set[str] = set()
    for name, field in cls.model_fields.items():
        keys.add(prefix + name)
        sub = _unwrap(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= _field_keys(sub, f"{prefix}{name}.")
    return keys


def format_validation_error(
    exc: ValidationError, root_cls: type[Section], source: str, override_keys: set[str],
    file_keys: set[str] | None = None,
) -> str:
    """One message naming every bad key, where it came from, and what is allowed.

    A cross-field rule's message names its keys; each gets where it was set (``file_keys``:
    the keys the file sets), so a value given on the command line is not blamed on the file.
    """
    lines = []
    known = _field_keys(root_cls)

    def origin_of(key: str) -> str:
        if key in override_keys:
            return COMMAND_LINE
        return source if file_keys is None or key in file_keys else DEFAULT

    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        origin = "command-line override" if key in override_keys else source
        kind = err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        named = sorted(set(re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b", msg)) & known, key=msg.index)
        if kind == "value_error" and named:
            lines.append(f"{msg} ({', '.join(f'{k} from {origin_of(k)}' for k in named)})")
            continue
        if kind == "extra_forbidden":
            section = _section_at(root_cls, loc)
            allowed = sorted(section.model_fields) if section else []
            lines.append(
                f"{key}: unknown key (in {origin}); allowed keys here: {', '.join(allowed)}"
            )
        elif kind == "missing":
            lines.append(f"{key}: required but not set (in {origin})")
        else:
            if not loc or kind == "value_error":
                # cross-field rules name their keys in the message itself
                lines.append(f"{msg} (in {origin})")
            else:
                lines.append(f"{key}: {msg}; got {err.get('input')!r} (in {origin})")
    return "invalid configuration: " + "; ".join(lines)


def _flatten_keys(tree: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            full = f"{prefix}{k}"
            keys.add(full)
            keys |= _flatten_keys(v, full + ".")
    return keys


def load_config(
    root_cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Load ``path`` (YAML), apply dotted ``overrides``, validate into ``root_cls``."""
    overrides = list(overrides or [])
    source = str(path) if path else "<defaults>"
    base: Any = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (pass --config PATH to a YAML file)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
        base = OmegaConf.create(data)
    over = _parse_overrides(overrides)
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(base, over), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not merge {source} with overrides {overrides}: {exc}") from None
    except TypeError as exc:  # a dotted index into a list (data.phases.0.x=...): OmegaConf cannot merge it
        raise ConfigError(f"could not merge {source} with overrides {overrides}: {exc}; a list cannot be "
                          "changed one item at a time from the command line: override the whole list, e.g. "
                          "'data.phases=[{start_step: 8, manifests: [...]}]'") from None
    override_keys = _flatten_keys(OmegaConf.to_container(over))
    file_keys = _flatten_keys(OmegaConf.to_container(base))
    try:
        cfg = root_cls.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, root_cls, source, override_keys, file_keys)) from None
    cfg._origins = {**{k: source for k in file_keys}, **{k: COMMAND_LINE for k in override_keys}}
    return cfg


def config_to_dict(cfg: BaseModel) -> dict:
    """Plain, YAML-safe dict of a config (enums and paths as strings)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML; ``load_config(type(cfg), file)`` reads it back identically."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, dump_config(cfg))
    return path


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def config_help(root_cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per leaf field: ``section.key (type, default ...): documentation``."""
    lines: list[str] = []
    for name, field in root_cls.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            doc = (field.description or ann.__doc__ or "").strip().splitlines()
            lines.append(f"[{key}] {doc[0] if doc else ''}")
            lines.extend(config_help(ann, key + "."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        desc = " ".join((field.description or "").split())
        lines.append(f"  {key} ({_type_name(ann)}, {default}): {desc}")
    return lines
