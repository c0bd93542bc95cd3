"""Small helpers around ``torch.distributed`` that are no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group is initialised (torchrun / SLURM / explicit init)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; returns ``tensor`` unchanged in one process."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
