"""Probe for the deepspeed-launcher harness: ZeRO-2 on a small MLP, each rank its own data.

Usage: deepspeed --num_gpus N tests/scripts/zero2_probe.py OUT_DIR STEPS
Writes OUT_DIR/initial.safetensors (rank 0) and OUT_DIR/rank<R>.safetensors after training.
"""

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

BATCH, DIM = 4, 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def batch_for(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, DIM, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    out, steps = args.out, args.steps
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.clone() for k, v in model.state_dict().items()}, out / "initial.safetensors")
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": BATCH * world,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(steps):
        x, y = batch_for(rank, step)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    state = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
    save_file(state, out / f"rank{rank}.safetensors")
    dist.barrier()


if __name__ == "__main__":
    main()
