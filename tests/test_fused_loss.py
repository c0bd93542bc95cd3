"""Fused Sinkhorn + swapped loss (swav_fast.losses.fused) against float64 formula references and
against the eager functions it replaces, compiled (inductor on the CPU) and not."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav_fast.losses import sinkhorn_knopp, swapped_prediction_loss
from swav_fast.losses.fused import compiled, fused_swav_loss, sinkhorn_codes, swapped_loss_from_codes
from swav_fast.methods.swav import SwAVObjective
from swav_fast.methods.swav import FeatureQueue


def reference_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Q = exp(S/eps)^T / sum; rows /= K*rowsum; cols /= B*colsum (n times); return (B*Q)^T, float64."""
    q = np.exp(scores.astype(np.float64) / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def reference_loss(scores: np.ndarray, codes: np.ndarray, assign: list[int], t: float) -> float:
    """(1/A) sum_j (1/(V-1)) sum_{v != a_j} -(1/B) sum_b sum_k q_j[b,k] log softmax(s_v[b]/t)[k]."""
    v_count = scores.shape[0]
    x = scores.astype(np.float64) / t
    m = x.max(-1, keepdims=True)
    log_p = x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)
    total = 0.0
    for j, a in enumerate(assign):
        total += sum(-(codes[j] * log_p[v]).sum(-1).mean() for v in range(v_count) if v != a) / (v_count - 1)
    return total / len(assign)


def _scores(*shape: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).uniform(-1, 1, size=shape), dtype=dtype)


@pytest.mark.parametrize("b,k,iters", [(64, 30, 3), (256, 3000, 3), (32, 100, 10), (16, 8, 1)])
def test_codes_match_float64_formula(b, k, iters):
    s = _scores(b, k)
    got = sinkhorn_codes(s, 0.05, iters)
    assert got.dtype == torch.float64
    expected = reference_sinkhorn(s.numpy(), 0.05, iters)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_codes_batched_over_leading_dims():
    s = _scores(3, 40, 25)
    got = sinkhorn_codes(s, 0.05, 3)
    for i in range(3):
        np.testing.assert_allclose(got[i].numpy(), reference_sinkhorn(s[i].numpy(), 0.05, 3), rtol=1e-10)


@pytest.mark.parametrize("dropped", [0, 1, 48])
def test_masked_rows_equal_sinkhorn_on_kept_rows(dropped):
    """Rows with weight 0 leave the problem: kept rows get the codes of Sinkhorn on them alone."""
    s = _scores(2, 64, 30, seed=dropped)
    s[:, :dropped] += 3.0  # dropped rows may score anything: they must not matter
    w = torch.cat([torch.zeros(dropped), torch.ones(64 - dropped)]).double()
    got = sinkhorn_codes(s, 0.05, 3, w)
    for i in range(2):
        expected = reference_sinkhorn(s[i, dropped:].numpy(), 0.05, 3)
        np.testing.assert_allclose(got[i, dropped:].numpy(), expected, rtol=1e-10, atol=1e-14)
    assert torch.equal(got[:, :dropped], torch.zeros_like(got[:, :dropped]))


def test_shift_invariance_and_large_scores():
    s = _scores(50, 40, seed=1, dtype=torch.float32)
    base = sinkhorn_codes(s)
    for c in (0.5, -3.0, 40.0):  # 40/0.05 = 800 would overflow exp without the shift
        torch.testing.assert_close(sinkhorn_codes(s + c), base, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("assign", [[0, 1], [0], [1, 3]])
def test_loss_matches_float64_formula(assign):
    rng = np.random.default_rng(0)
    v, b, k = 5, 7, 11
    scores = rng.uniform(-1, 1, size=(v, b, k))
    codes = rng.dirichlet(np.ones(k), size=(len(assign), b))
    got = swapped_loss_from_codes(torch.tensor(scores), torch.tensor(codes), assign, 0.1)
    assert got.dtype == torch.float64
    assert abs(got.item() - reference_loss(scores, codes, assign, 0.1)) < 1e-12


def test_full_fused_loss_float64_against_formula():
    scores = _scores(4, 16, 12, seed=3)
    codes = np.stack([reference_sinkhorn(scores[a].numpy(), 0.05, 3) for a in (0, 1)])
    got = fused_swav_loss(scores, [0, 1], 0.1, 0.05, 3)
    assert abs(got.item() - reference_loss(scores.numpy(), codes, [0, 1], 0.1)) < 1e-12


def _eager_loss(scores, assign, queue_scores=None, use_queue=False, eps=0.05, iters=3, t=0.1):
    """The eager path of SwAVObjective: sinkhorn_knopp per assigned view, queue rows prepended."""
    codes = []
    for j, a in enumerate(assign):
        s = scores[a].detach()
        if use_queue:
            s = torch.cat([queue_scores[j], s])
        codes.append(sinkhorn_knopp(s, eps, iters)[-scores.shape[1]:])
    return swapped_prediction_loss(scores, torch.stack(codes), assign, t)


@pytest.mark.parametrize("use_queue", [None, False, True])
def test_fused_equals_eager_functions_float32(use_queue):
    """Loss and gradient of the scores, with no queue, an inactive queue and an active one."""
    v, b, k, length = 6, 32, 50, 64
    scores = _scores(v, b, k, seed=4, dtype=torch.float32)
    queue_scores = _scores(2, length, k, seed=5, dtype=torch.float32) if use_queue is not None else None
    flag = None if use_queue is None else torch.tensor(use_queue)
    a = scores.clone().requires_grad_()
    fused = fused_swav_loss(a, [0, 1], queue_scores=queue_scores, use_queue=flag)
    fused.backward()
    e = scores.clone().requires_grad_()
    eager = _eager_loss(e, [0, 1], queue_scores, bool(use_queue))
    eager.backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-7)


def test_float32_inside_whatever_the_autocast():
    s = _scores(4, 64, 300, seed=6, dtype=torch.float32).to(torch.bfloat16)
    s[0, 0] = 1.0
    s[1, 1] = -1.0
    expected = fused_swav_loss(s.float(), [0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_swav_loss(s, [0, 1])
        codes = sinkhorn_codes(s[0])
    assert got.dtype == torch.float32 and codes.dtype == torch.float32
    assert torch.equal(got, expected)  # bf16 -> f32 is exact, then the same float32 arithmetic
    assert torch.isfinite(codes).all()
    half = sinkhorn_codes(s[0].half())  # exp(1/0.05) would overflow in fp16
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_compiled_matches_eager_functions():
    """torch.compile (inductor, CPU) of the fused loss: same loss and gradient as the eager functions."""
    v, b, k, length = 4, 16, 24, 32
    scores = _scores(v, b, k, seed=7, dtype=torch.float32)
    queue_scores = _scores(2, length, k, seed=8, dtype=torch.float32)
    fn = compiled("loss")
    for use in (False, True):  # one compilation: the flag is data, not a guard
        a = scores.clone().requires_grad_()
        got = fn(a, [0, 1], 0.1, 0.05, 3, queue_scores, torch.tensor(use))
        got.backward()
        e = scores.clone().requires_grad_()
        ref = _eager_loss(e, [0, 1], queue_scores, use)
        ref.backward()
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-7)
    codes = compiled("codes")(scores[0], 0.05, 3)
    torch.testing.assert_close(codes, sinkhorn_knopp(scores[0], 0.05, 3), rtol=1e-5, atol=1e-7)


def test_unknown_compiled_name():
    with pytest.raises(ValueError, match="unknown fused function"):
        compiled("nope")


# -- device-side queue -----------------------------------------------------------------------------
def test_push_where_equals_push_or_nothing():
    q, ref = FeatureQueue(2, 6, 3), FeatureQueue(2, 6, 3)
    for i in range(4):
        emb = torch.full((2, 2, 3), float(i + 1))
        on = i != 1
        q.push_where(emb, torch.tensor(on))
        if on:
            ref.push(emb)
        assert torch.equal(q.items, ref.items) and int(q.count) == int(ref.count)
        assert bool(q.full()) == ref.is_full()
    assert q.items[0, :, 0].tolist() == [4, 4, 3, 3, 1, 1]


def test_push_where_batch_as_long_as_queue():
    q = FeatureQueue(1, 4, 2)
    q.push_where(torch.ones(1, 4, 2), torch.tensor(True))
    assert bool(q.full()) and torch.equal(q.items, torch.ones(1, 4, 2))


def test_objective_fused_path_matches_eager_over_queue_phases():
    """Inactive queue, filling, full and used: same losses, same queue contents, same saved keys."""
    torch.manual_seed(0)
    eager = SwAVObjective(4, [0, 1], queue_length=16, embed_dim=6)
    fused = SwAVObjective(4, [0, 1], queue_length=16, embed_dim=6)
    fused.fused = True
    protos = F.normalize(torch.randn(10, 6), dim=1)
    for it in range(6):
        if it == 1:
            eager.queue_active = fused.queue_active = True
        z = F.normalize(torch.randn(32, 6), dim=1)
        s = z @ protos.t()
        torch.testing.assert_close(fused(z, s, protos), eager(z, s, protos), rtol=1e-5, atol=0)
        assert torch.equal(fused.queue.items, eager.queue.items)
        assert int(fused.queue.count) == int(eager.queue.count) == 8 * max(0, it)
    assert list(fused.state_dict()) == ["queue.items", "queue.count"]  # the flag is not saved
    assert fused.queue_active and not SwAVObjective(4, queue_length=16, embed_dim=6).queue_active


# -- torch.distributed -----------------------------------------------------------------------------
def _dist_worker(rank: int, world: int, init_file: str, scores: torch.Tensor, weights: torch.Tensor,
                 out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local, w = scores.chunk(world)[rank], weights.chunk(world)[rank]
        torch.save({"plain": sinkhorn_codes(local, 0.05, 3), "masked": sinkhorn_codes(local, 0.05, 3, w)},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_halves_equal_the_whole(tmp_path):
    """Under a 2-process group the maximum, the prototype sums and the sample count are global."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    scores = torch.empty(64, 40, dtype=torch.float64).uniform_(-1, 1)
    scores[:32] += 0.3
    weights = torch.ones(64, dtype=torch.float64)
    weights[:10] = 0  # rank 0 drops 10 rows, rank 1 none
    out = str(tmp_path / "q")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), scores, weights, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    plain = torch.cat([p["plain"] for p in parts])
    np.testing.assert_allclose(plain.numpy(), reference_sinkhorn(scores.numpy(), 0.05, 3), rtol=1e-10)
    masked = torch.cat([p["masked"] for p in parts])
    expected = reference_sinkhorn(scores[10:].numpy(), 0.05, 3)
    np.testing.assert_allclose(masked[10:].numpy(), expected, rtol=1e-10)
    assert not masked[:10].any()
