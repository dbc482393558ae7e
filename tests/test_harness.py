"""The multi-rank harness itself: gloo ranks in-process and the deepspeed launcher on CPU."""

import importlib.util

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.harness import ROOT, run_deepspeed, run_on_ranks


def _allreduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


@pytest.mark.distributed
def test_run_on_ranks_allreduce():
    assert run_on_ranks(_allreduce_rank, 2) == [3.0, 3.0]


def _failing_rank(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")


@pytest.mark.distributed
def test_run_on_ranks_reports_rank_failure():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_on_ranks(_failing_rank, 2)


def _load_probe():
    spec = importlib.util.spec_from_file_location("zero2_probe", ROOT / "tests/scripts/zero2_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero2_two_ranks_match_single_process(tmp_path):
    steps = 4
    result = run_deepspeed(
        ROOT / "tests/scripts/zero2_probe.py", [str(tmp_path), str(steps)],
        num_gpus=2, timeout=900, log_dir=tmp_path / "logs",
    ).check()
    assert set(result.rank_logs) == {0, 1}, result.describe()
    initial = load_file(tmp_path / "initial.safetensors")
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")

    probe = _load_probe()
    model = probe.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        xs, ys = zip(*(probe.batch_for(r, step) for r in range(2)))
        loss = torch.nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = model.state_dict()

    for name in initial:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        assert not torch.equal(rank0[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-5, atol=1e-6)


def test_orphan_shm_segments_are_removed_and_mapped_ones_kept():
    import mmap
    import os
    from pathlib import Path

    from tests.harness import remove_orphan_shm_segments

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    orphan = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test_orphan_0")
    live = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test_live_0")
    orphan.write_bytes(b"x" * 4096)
    live.write_bytes(b"y" * 4096)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096) as held:
        removed = remove_orphan_shm_segments()
        assert str(orphan) in removed and not orphan.exists()
        assert live.exists() and held[:1] == b"y"
    live.unlink()
