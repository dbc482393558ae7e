"""Collectives on the training device: only training/collectives.py calls torch.distributed
collectives (it places every tensor on the device it is given), the helpers reduce correctly on
real gloo ranks, and the non-finite check is one fused reduction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.harness import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "training" / "collectives.py"
COLLECTIVES = {
    "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather", "scatter",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier",
    "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "send",
    "recv", "isend", "irecv", "monitored_barrier",
}


def collective_calls(path: Path) -> list[str]:
    """``<module>.<collective>(...)`` calls and ``from torch.distributed import <collective>``
    (also DeepSpeed's ``deepspeed.comm``) in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {"dist", "torch.distributed", "deepspeed.comm", "comm"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name in ("torch.distributed", "deepspeed.comm")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "deepspeed.comm"):
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"line {node.lineno}: {owner}.{node.func.attr}")
    return found


def test_only_the_helper_module_calls_collectives():
    bad = {str(p.relative_to(ROOT)): calls for p in sorted((ROOT / "training").rglob("*.py"))
           if p != HELPER and (calls := collective_calls(p))}
    assert not bad, f"collectives outside training/collectives.py (route them through it): {bad}"
    assert collective_calls(HELPER), "the helper module itself must hold the collectives"


def test_the_check_sees_direct_calls(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch.distributed as dist\nfrom torch.distributed import barrier\n"
                   "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.broadcast(t, 0)\n")
    assert collective_calls(src) == ["line 2: imports barrier", "line 4: dist.all_reduce",
                                     "line 5: torch.distributed.broadcast"]


def _reduce(rank: int, world_size: int) -> dict:
    from training.collectives import (
        broadcast_object,
        gather_objects,
        min_over_ranks,
        sum_over_ranks,
        true_on_every_rank,
    )

    device = torch.device("cpu")
    values = torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)
    return {
        "sum": sum_over_ranks(values, device).tolist(),
        "min": min_over_ranks(values, device).tolist(),
        "input_unchanged": values.tolist() == [1.0 + rank, 10.0 * rank],
        "all_true": true_on_every_rank(torch.tensor(True)),
        "one_false": true_on_every_rank(torch.tensor(rank == 0)),
        "broadcast": broadcast_object({"from": rank}),
        "gathered": gather_objects(rank * 2, world_size),
    }


@pytest.mark.distributed
def test_helpers_on_two_gloo_ranks():
    for result in run_on_ranks(_reduce, 2, timeout=120):
        assert result["sum"] == [3.0, 10.0] and result["min"] == [1.0, 0.0]
        assert result["input_unchanged"]  # the reduction works on the device copy
        assert result["all_true"] and not result["one_false"]
        assert result["broadcast"] == {"from": 0} and result["gathered"] == [0, 2]


def test_non_finite_check_is_one_fused_flag():
    from training.optim import all_finite

    grads = [torch.ones(3, 4), torch.zeros(5, dtype=torch.float64), torch.full((2,), 1e6)]
    flag = all_finite(grads)
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [g.clone() for g in grads]
        broken[1][3] = bad
        assert not bool(all_finite(broken))
    assert bool(all_finite([]))
