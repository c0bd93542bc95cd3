"""Sinkhorn-Knopp against a float64 reference written from the formula."""
import numpy as np
import pytest
import torch

from swav_fast.losses import sinkhorn_knopp


def reference_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Q = exp(S/eps)^T / sum; rows /= K*rowsum; cols /= B*colsum; return (B*Q)^T, in float64."""
    q = np.exp(scores.astype(np.float64) / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


@pytest.mark.parametrize("b,k,iters", [(64, 30, 3), (256, 3000, 3), (32, 100, 10)])
def test_matches_float64_reference(b, k, iters):
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(b, k))
    got = sinkhorn_knopp(torch.tensor(scores, dtype=torch.float32), 0.05, iters).double().numpy()
    np.testing.assert_allclose(got, reference_sinkhorn(scores, 0.05, iters), rtol=2e-4, atol=1e-9)


def test_marginals():
    """Rows (samples) sum to 1; prototype usage tends to B/K per prototype with more iterations."""
    torch.manual_seed(0)
    b, k = 128, 64
    scores = torch.nn.functional.normalize(torch.randn(b, 16), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(k, 16), dim=1).t()
    q = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b), rtol=1e-5, atol=1e-5)
    col3 = q.sum(dim=0)
    q50 = sinkhorn_knopp(scores, 0.05, 50)
    col50 = q50.sum(dim=0)
    target = torch.full((k,), b / k)
    assert (col50 - target).abs().max() < 1e-2 * b / k
    # more iterations bring the prototype marginal closer to equipartition
    assert (col50 - target).abs().max() < (col3 - target).abs().max()
    assert (q >= 0).all()


def test_shift_invariance_and_large_scores():
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.uniform(-1, 1, size=(50, 40)), dtype=torch.float32)
    base = sinkhorn_knopp(s)
    for c in (0.5, -3.0, 40.0):  # 40/0.05 = 800 would overflow exp without the shift
        torch.testing.assert_close(sinkhorn_knopp(s + c), base, rtol=1e-4, atol=1e-6)


def test_finite_for_cosine_range_and_fp16_input():
    s = torch.empty(4096, 300).uniform_(-1, 1)
    s[0] = 1.0
    s[1] = -1.0
    q = sinkhorn_knopp(s.half(), 0.05, 3)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q2 = sinkhorn_knopp(s, 0.05, 3)
    assert q2.dtype == torch.float32 and torch.isfinite(q2).all()
