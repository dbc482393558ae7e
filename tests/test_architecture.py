"""The structure the code must keep (ARCHITECTURE.md): no import cycles, no imports of another
module's private names, dependencies pointing one way, and stages chained in one place only.

Imports are read from the source (``ast``), including imports inside functions, so a cycle
hidden behind a function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("crucible", "data_pipeline", "model", "training", "launcher")
# what each top-level package may import (besides itself); launcher may import everything
LAYERS = {
    "crucible": set(),
    "model": {"crucible"},
    "data_pipeline": {"crucible"},
    "training": {"crucible", "model", "data_pipeline"},
    "launcher": {"crucible", "model", "data_pipeline", "training"},
}
# data_pipeline subpackages follow the data; what one stage may use of another stage
DATA_STAGE_DEPENDENCIES = {
    "data_pipeline.executors": set(),
    "data_pipeline.clean": {"data_pipeline.executors"},
    # reads the clean-shard format
    "data_pipeline.tokenizer": {"data_pipeline.clean.output"},
    # reads clean shards, loads the tokenizer, encodes on an executor
    "data_pipeline.shards": {"data_pipeline.clean.output", "data_pipeline.tokenizer",
                             "data_pipeline.executors"},
    # reads the token-shard manifest and tar layout
    "data_pipeline.loader": {"data_pipeline.shards.manifest", "data_pipeline.shards.tario"},
}
# the modules outside the stages: the one that chains stages, and the root config that combines
# the stages' config sections (every stage may read the root config)
DATA_STAGE_CHAINERS = {"data_pipeline.stages", "data_pipeline.config"}
DATA_ROOT_CONFIG = "data_pipeline.config"


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            names = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # ``from pkg import module``
                    found.append((sub, [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((base, names, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = project_modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, path in modules.items():
        for target, _, line in imports_of(name, path, modules):
            if target in modules and target != name:
                graph[name].setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_project_modules_import_no_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    graph = {"a": {"b": 1}, "b": {"a": 5}, "c": {"a": 1}}
    assert find_cycles(graph) == [["a", "b"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from model.io import find_model_dir\n")
    assert imports_of("training.m", src, {"model.io": src}) == [("model.io", ["find_model_dir"], 2)]


def test_no_module_imports_a_private_name_of_another():
    modules = project_modules()
    files = dict(modules)
    for folder in ("tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    bad = []
    for name, path in files.items():
        for target, names, line in imports_of(name, path, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [target.rsplit(".", 1)[-1]] if target.rsplit(".", 1)[-1].startswith("_") \
                and not target.endswith("__init__") and not target.rsplit(".", 1)[-1].startswith("__") else []
            if private and target != name:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_dependencies_point_one_way():
    bad = []
    for name, targets in import_graph().items():
        top = name.split(".")[0]
        for target, line in targets.items():
            other = target.split(".")[0]
            if other != top and other not in LAYERS[top]:
                bad.append(f"{name}:{line} imports {target} ({top} must not depend on {other})")
    assert not bad, "\n".join(bad)


def _stage_of(module: str) -> str | None:
    return next((s for s in DATA_STAGE_DEPENDENCIES if module == s or module.startswith(s + ".")), None)


def test_data_stages_use_only_what_the_data_flow_allows():
    graph = import_graph()
    stages = [m for m in graph if m.startswith("data_pipeline.")]
    assert any(_stage_of(m) for m in stages), "data_pipeline has no stage subpackages"
    bad = []
    for name in stages:
        stage = _stage_of(name)
        for target, line in graph[name].items():
            if not target.startswith("data_pipeline.") or _stage_of(target) == stage \
                    or target == DATA_ROOT_CONFIG:
                continue
            if name in DATA_STAGE_CHAINERS:
                continue
            if stage is None:
                bad.append(f"{name}:{line} imports {target}: only "
                           f"{sorted(DATA_STAGE_CHAINERS)} sit outside a stage and chain stages")
                continue
            allowed = DATA_STAGE_DEPENDENCIES[stage]
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{name}:{line} imports {target} ({stage} may use only {sorted(allowed)})")
    assert not bad, "\n".join(bad)


def test_only_the_stage_chainer_starts_other_stages():
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        if not name.startswith("data_pipeline.") or name in DATA_STAGE_CHAINERS:
            continue
        for target, names, line in imports_of(name, path, modules):
            starts = [n for n in names if n.startswith("run_")]
            if starts and target.startswith("data_pipeline.") and _stage_of(target) != _stage_of(name):
                bad.append(f"{name}:{line} starts another stage: {starts} from {target}")
    assert not bad, "\n".join(bad)
