"""Provenance written beside every output: resolved config, code version, library versions.

Deliberately free of timestamps and host names so that outputs stay byte-identical from run
to run.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import crucible
from crucible.config import config_to_dict, save_config
from crucible.fileio import atomic_write_json

LIBRARIES = ("torch", "deepspeed", "transformers", "sentencepiece", "webdataset", "datasets")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version() -> dict[str, Any]:
    """Git commit (and whether the tree had local changes) or the package version."""
    info: dict[str, Any] = {"package_version": crucible.__version__}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        info["git_commit"] = commit
        info["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def provenance(cfg: BaseModel | None = None) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "code": code_version(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }
    if cfg is not None:
        prov["config"] = config_to_dict(cfg)
    return prov


def write_provenance(output_dir: str | Path, cfg: BaseModel | None = None) -> dict[str, Any]:
    """Write ``config.yaml`` (resolved config) and ``provenance.json`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        save_config(cfg, out / "config.yaml")
    prov = provenance(cfg)
    atomic_write_json(out / "provenance.json", prov)
    return prov
