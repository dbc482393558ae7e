"""Process-level runtime helpers: rank discovery and rank-aware logging."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def env_rank() -> int:
    """Global rank as set by the deepspeed launcher, torchrun or Slurm (0 when single process)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def env_world_size() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(
    level: str = "INFO",
    rank: int | None = None,
    all_ranks: bool = False,
    rank_log_dir: str | Path | None = None,
) -> logging.Logger:
    """Configure the ``crucible`` loggers for this process.

    Rank 0 prints at ``level``; other ranks print only warnings and errors unless
    ``all_ranks``. With ``rank_log_dir`` every rank also writes everything to
    ``rank_log_dir/rank<N>.log``.
    """
    rank = env_rank() if rank is None else rank
    fmt = logging.Formatter(
        "%(asctime)s [rank%(rank)d] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_crucible", False):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if (rank == 0 or all_ranks) else "WARNING")
    console.setFormatter(fmt)
    console.addFilter(_RankFilter(rank))
    console._crucible = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if rank_log_dir is not None:
        Path(rank_log_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(rank_log_dir) / f"rank{rank}.log")
        fh.setLevel("DEBUG")
        fh.setFormatter(fmt)
        fh.addFilter(_RankFilter(rank))
        fh._crucible = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.setLevel("DEBUG" if rank_log_dir is not None else level)
    return logging.getLogger("crucible")
