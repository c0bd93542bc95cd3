"""Distributed Sinkhorn (gloo, 2 processes) equals single-process Sinkhorn on the whole batch."""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swav_fast.losses import sinkhorn_knopp


def _worker(rank: int, world: int, init_file: str, scores: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = scores.chunk(world)[rank]
        torch.save(sinkhorn_knopp(local, 0.05, 3), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_halves_equal_whole(tmp_path):
    torch.manual_seed(0)
    scores = torch.empty(64, 300).uniform_(-1, 1)
    scores[:32] += 0.3  # the two halves differ, so a per-rank normalisation would give other codes
    out = str(tmp_path / "q")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), scores, out), nprocs=2, join=True)
    q = torch.cat([torch.load(f"{out}.{r}", weights_only=True) for r in range(2)])
    torch.testing.assert_close(q, sinkhorn_knopp(scores, 0.05, 3), rtol=1e-6, atol=1e-6)
    # and it is not what each rank would get alone
    alone = torch.cat([sinkhorn_knopp(h, 0.05, 3) for h in scores.chunk(2)])
    assert (alone - q).abs().max() > 1e-3
