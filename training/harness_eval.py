"""Downstream evaluation with lm-evaluation-harness: task lookup, a run over our model, the
scalars (``eval/<task>/<metric>``) and the results file.

Used by ``launcher/evaluate.py`` (a saved model) and by the in-loop callback
(:mod:`training.callbacks.harness`, the model being trained). The harness (``lm_eval``) is
imported inside these functions only, so no other entry point pays for its import.

Task names are looked up in the bundled task folder (``data/sample/eval``: tiny tasks whose
data ship with the repository), then in the include paths given, then among the harness's
standard tasks (whose data the harness downloads from the Hugging Face hub, or reads from its
cache when ``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crucible.errors import UserError

log = logging.getLogger("crucible.training.harness")

BUNDLED_TASKS = Path(__file__).resolve().parent.parent / "data" / "sample" / "eval"


def _include_paths(include_paths: Sequence[str | Path]) -> list[str]:
    paths = [str(BUNDLED_TASKS)]
    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"task include path {path} is not a directory; give a folder of "
                            "lm-evaluation-harness task YAML files")
        paths.append(str(Path(path)))
    return paths


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """A harness ``TaskManager`` that knows every name in ``tasks``; the harness's standard
    tasks are indexed (a few seconds) only when a name is not in the bundled or included
    folders. An unknown name is a :class:`UserError` that says where tasks come from."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("no task given: name lm-evaluation-harness tasks, e.g. crucible_sentiment "
                        "(bundled) or hellaswag (standard)")
    paths = _include_paths(include_paths)
    local = TaskManager(include_path=paths, include_defaults=False)
    manager = TaskManager(include_path=paths, include_defaults=True) if _unknown(local, tasks) else local
    unknown = _unknown(manager, tasks)
    if unknown:
        local_names = sorted(t for t in local.all_tasks if not t.startswith("_"))
        raise UserError(
            f"unknown lm-evaluation-harness task(s) {', '.join(unknown)}: not a standard task "
            f"(`lm_eval ls tasks` lists them) nor a task YAML in {', '.join(paths)} "
            f"(local tasks: {', '.join(local_names)}); check the spelling or pass the folder of your "
            "task files as an include path")
    return manager


def _unknown(manager: Any, tasks: Sequence[str]) -> list[str]:
    return [t for t in tasks if not manager.match_tasks([t])]


def evaluate_tasks(lm: Any, tasks: Sequence[str], include_paths: Sequence[str | Path] = (),
                   limit: float | None = None, num_fewshot: int | None = None,
                   log_samples: bool = False, bootstrap_iters: int = 100000,
                   manager: Any = None) -> dict[str, Any]:
    """Run the harness on ``lm`` (a harness ``LM``); returns the harness's results dictionary.

    ``limit``: items per task, a count (>= 1) or a fraction (< 1); None: all.
    ``bootstrap_iters``: resamples for the standard errors of metrics that are not means (0:
    no standard errors, the quick choice during training). The harness
    seeds Python, NumPy and torch itself; callers that must keep their random state (the
    in-loop callback) save and restore it around this call.
    """
    from lm_eval import simple_evaluate

    if limit is not None and not limit > 0:
        raise UserError(f"the item limit per task must be positive (got {limit})")
    if limit is not None and limit >= 1:
        limit = int(limit)
    manager = manager or task_manager(tasks, include_paths)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=log_samples,
                                  bootstrap_iters=bootstrap_iters)
    except (ConnectionError, FileNotFoundError) as exc:  # the datasets library's "cannot get the data"
        raise UserError(
            f"the data of task(s) {', '.join(tasks)} could not be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); standard tasks download "
            "from the Hugging Face hub once (or read its cache with HF_DATASETS_OFFLINE=1); offline, "
            "use a task YAML with a local JSON/JSONL data file in an include path") from None
    if results is None:  # only non-zero ranks of the harness's own multi-process runs
        raise RuntimeError("lm-evaluation-harness returned no results")
    return results


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``eval/<task>/<metric>`` for every numeric metric of every task and group (standard
    errors left out; a filter other than the default ``none`` is appended: ``exact_match_strip``)."""
    scalars = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            scalars[f"eval/{task}/{name}"] = float(value)
    return scalars


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """The harness's results JSON (``results.json``, as its own CLI writes it) and, when the
    run logged them, the per-item samples (``samples_<task>.jsonl``); returns the JSON path."""
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples") or {}
    summary = {k: v for k, v in results.items() if k != "samples"}
    path = out_dir / "results.json"
    path.write_text(json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False)
                    + "\n", encoding="utf-8")
    for task, items in samples.items():
        with open(out_dir / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, default=handle_non_serializable, ensure_ascii=False) + "\n" for item in items)
    return path


def results_table(results: dict[str, Any]) -> str:
    """The harness's markdown table of the results (tasks, then groups if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
