"""Losses of the method family against float64 evaluations of each paper's formula, their gradients
(``gradcheck``), stop-gradients, and float32 maths under bf16 autocast."""
import math

import numpy as np
import pytest
import torch

from swav_fast.losses.barlow import barlow_twins_loss, cross_correlation
from swav_fast.losses.contrastive import (bank_softmax_loss, estimate_log_z, info_nce_loss, nce_loss,
                                         nt_xent_loss, view_pairs)
from swav_fast.losses.dino import dino_loss, teacher_probabilities, updated_center
from swav_fast.losses.regression import negative_cosine_loss, normalized_mse_loss

RTOL = 1e-10  # float64 in, float64 maths: only summation order differs


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


# ---- references, written from the papers' formulas -------------------------------------------


def ref_info_nce(q, k, negatives, tau):
    """MoCo: -log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t)); v3: the batch's keys as the set."""
    q, k = _unit(q), _unit(k)
    total = 0.0
    for b in range(len(q)):
        pos = q[b] @ k[b] / tau
        if negatives is None:
            logits = np.array([q[b] @ k[c] / tau for c in range(len(k))])
        else:
            logits = np.array([pos] + [q[b] @ n / tau for n in negatives])
        total += -(pos - _logsumexp(logits))
    return total / len(q)


def ref_simclr(z1, z2, tau):
    """SimCLR Algorithm 1: z_{2k-1}, z_{2k} are the two views of sample k;
    l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t); L = 1/2N sum_k [l(2k-1,2k) + l(2k,2k-1)]."""
    n = len(z1)
    z = np.empty((2 * n, z1.shape[1]))
    z[0::2], z[1::2] = z1, z2
    z = _unit(z)

    def ell(i, j):
        others = np.array([z[i] @ z[k] / tau for k in range(2 * n) if k != i])
        return -(z[i] @ z[j] / tau - _logsumexp(others))

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def ref_multiview_nt_xent(z, tau, anchor_samples=None):
    """V views: each anchor averages -log softmax over its V-1 positives (all others in the denominator);
    the anchors are the views of ``anchor_samples`` (default every sample)."""
    v_count, b_count, _ = z.shape
    flat = _unit(z.reshape(v_count * b_count, -1))
    total, terms = 0.0, 0
    for i in range(v_count * b_count):
        if anchor_samples is not None and i % b_count not in anchor_samples:
            continue
        others = np.array([flat[i] @ flat[k] / tau for k in range(v_count * b_count) if k != i])
        for p in range(v_count * b_count):
            if p != i and p % b_count == i % b_count:
                total += -(flat[i] @ flat[p] / tau - _logsumexp(others))
                terms += 1
    return total / terms


def ref_nce(scores, tau, z_const, n, eps=0.0):
    """InstDisc Eq. (5)-(7): P(i|v) = exp(v_i.f/t)/Z, h = P/(P + m/n),
    J = -E[log h(pos)] - sum_noise log(1 - h). With ``eps`` as lemniscate's NCECriterion
    (``lnPmt = log(P / (P + m Pn + eps))``, ``lnPon = log(m Pn / (P + m Pn + eps))``)."""
    m = scores.shape[1] - 1
    p = np.exp(scores / tau) / z_const
    den = p + m / n + eps
    return -np.mean(np.log(p[:, 0] / den[:, 0]) + np.sum(np.log((m / n) / den[:, 1:]), axis=1))


def ref_bank_softmax(scores, targets, tau):
    """InstDisc Eq. (2) over the whole bank: P(i|f) = exp(v_i.f/t) / sum_j exp(v_j.f/t),
    J = -E[log P(i|f)]."""
    return -np.mean([scores[b, i] / tau - _logsumexp(scores[b] / tau) for b, i in enumerate(targets)])


def ref_barlow(za, zb, lambd, eps=1e-5):
    """C_ij = sum_b za_bi zb_bj / B of batch-standardised embeddings;
    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2."""
    def standardise(z):
        return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)  # numpy var: biased, as BN

    a, b = standardise(za), standardise(zb)
    batch, dim = za.shape
    c = np.zeros((dim, dim))
    for i in range(dim):
        for j in range(dim):
            c[i, j] = sum(a[k, i] * b[k, j] for k in range(batch)) / batch
    on = sum((1 - c[i, i]) ** 2 for i in range(dim))
    off = sum(c[i, j] ** 2 for i in range(dim) for j in range(dim) if i != j)
    return on + lambd * off


def ref_dino(student, teacher, center, tau_s, tau_t):
    """DINO: mean over pairs (teacher global g, student view v != g) of
    -(1/B) sum_b sum_k P_t[b,k] log P_s[b,k], P_t = softmax((t - c)/tau_t), P_s = softmax(s/tau_s)."""
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    total, pairs = 0.0, 0
    for g in range(teacher.shape[0]):
        p_t = softmax((teacher[g] - center) / tau_t)
        for v in range(student.shape[0]):
            if v == g:
                continue
            log_p_s = np.log(softmax(student[v] / tau_s))
            total += -np.mean(np.sum(p_t * log_p_s, axis=1))
            pairs += 1
    return total / pairs


# ---- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_queue", [True, False])
def test_info_nce_matches_formula(with_queue):
    rng = _rng(1)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    negatives = _unit(rng.normal(size=(9, 5))) if with_queue else None
    got = info_nce_loss(_t(q), _t(k), None if negatives is None else _t(negatives), 0.2)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), ref_info_nce(q, k, negatives, 0.2), rel_tol=RTOL)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_two_views_is_simclr(tau):
    rng = _rng(2)
    z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    got = nt_xent_loss(_t(np.stack([z1, z2])), tau)
    assert math.isclose(got.item(), ref_simclr(z1, z2, tau), rel_tol=RTOL)


def test_nt_xent_multi_crop():
    z = _rng(3).normal(size=(3, 4, 5))
    assert math.isclose(nt_xent_loss(_t(z), 0.3).item(), ref_multiview_nt_xent(z, 0.3), rel_tol=RTOL)


def test_nt_xent_anchor_subset_is_one_ranks_share():
    """Under DDP each rank anchors its own samples against everyone's: the ranks' mean is the whole loss."""
    z = _rng(9).normal(size=(3, 6, 4))
    got = nt_xent_loss(_t(z), 0.2, anchors=slice(2, 4))
    assert math.isclose(got.item(), ref_multiview_nt_xent(z, 0.2, anchor_samples={2, 3}), rel_tol=RTOL)
    parts = [nt_xent_loss(_t(z), 0.2, anchors=slice(r * 2, r * 2 + 2)).item() for r in range(3)]
    assert math.isclose(sum(parts) / 3, ref_multiview_nt_xent(z, 0.2), rel_tol=RTOL)


def test_info_nce_key_offset_picks_this_ranks_positives():
    """MoCo v3 under DDP: queries of rank r against every rank's keys, positives at rows r*B + b."""
    rng = _rng(10)
    q, k = rng.normal(size=(3, 5)), rng.normal(size=(9, 5))
    qn, kn = _unit(q), _unit(k)
    ref = np.mean([-(qn[b] @ kn[3 + b] / 0.2 - _logsumexp(kn @ qn[b] / 0.2)) for b in range(3)])
    got = info_nce_loss(_t(q), _t(k), None, 0.2, key_offset=3)
    assert math.isclose(got.item(), ref, rel_tol=RTOL)


def test_nt_xent_needs_two_views():
    with pytest.raises(ValueError, match="at least 2 views"):
        nt_xent_loss(torch.randn(1, 4, 3))


def test_nce_matches_formula_and_z_estimate():
    rng = _rng(4)
    n, tau = 50, 0.07
    scores = np.clip(rng.normal(0, 0.3, size=(6, 1 + 8)), -1, 1)
    z_const = n * np.mean(np.exp(scores / tau))  # the paper's Monte-Carlo estimate of Z
    log_z = estimate_log_z(_t(scores), tau, n)
    assert math.isclose(log_z.item(), math.log(z_const), rel_tol=RTOL)
    got = nce_loss(_t(scores), tau, log_z, n)  # lemniscate's epsilon 1e-7 by default
    assert math.isclose(got.item(), ref_nce(scores, tau, z_const, n, eps=1e-7), rel_tol=1e-9)
    exact = nce_loss(_t(scores), tau, log_z, n, eps=0.0)  # the paper's formula
    assert math.isclose(exact.item(), ref_nce(scores, tau, z_const, n), rel_tol=1e-9)
    assert not math.isclose(got.item(), exact.item(), rel_tol=1e-9)  # the epsilon is really there


def test_bank_softmax_matches_formula_and_is_stable_in_float32():
    rng = _rng(5)
    scores = np.clip(rng.normal(0, 0.4, size=(6, 30)), -1, 1)
    targets = rng.integers(0, 30, size=6)
    got = bank_softmax_loss(_t(scores), torch.tensor(targets), 0.07)
    assert math.isclose(got.item(), ref_bank_softmax(scores, targets, 0.07), rel_tol=RTOL)
    # exp(1 / 0.01) overflows float32: the float32 loss is still finite and right
    sharp = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.9, 0.1]])
    loss = bank_softmax_loss(sharp, torch.tensor([0, 2]), 0.01)
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), ref_bank_softmax(sharp.double().numpy(), [0, 2], 0.01), rel_tol=1e-6)


def test_bank_softmax_over_views_returns_the_normalisers_of_its_own_pass():
    rng = _rng(6)
    scores = np.clip(rng.normal(0, 0.4, size=(3, 5, 40)), -1, 1)  # [V, B, n]
    targets = rng.integers(0, 40, size=5)
    loss, log_z = bank_softmax_loss(_t(scores), torch.tensor(targets), 0.1, return_log_z=True)
    # the mean over views of each view's loss (every view discriminates against the same bank)
    want = np.mean([ref_bank_softmax(scores[v], targets, 0.1) for v in range(3)])
    assert math.isclose(loss.item(), want, rel_tol=RTOL)
    assert log_z.shape == (3, 5) and not log_z.requires_grad
    np.testing.assert_allclose(log_z.numpy(), [[_logsumexp(scores[v, b] / 0.1) for b in range(5)]
                                               for v in range(3)], rtol=RTOL)
    assert math.isclose(bank_softmax_loss(_t(scores), torch.tensor(targets), 0.1).item(), loss.item(),
                        rel_tol=1e-15)


def test_nce_is_stable_where_the_direct_formula_overflows_float32():
    scores = torch.tensor([[1.0, 0.0, -1.0]])  # exp(1/0.01) overflows float32, not float64
    loss = nce_loss(scores, 0.01, torch.tensor(5.0), 1000)
    assert torch.isfinite(loss)
    ref = ref_nce(scores.double().numpy(), 0.01, math.exp(5.0), 1000, eps=1e-7)
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)


def test_byol_normalized_mse_matches_formula():
    rng = _rng(5)
    p, z = rng.normal(size=(7, 6)), rng.normal(size=(7, 6))
    ref = np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1))
    assert math.isclose(normalized_mse_loss(_t(p), _t(z)).item(), ref, rel_tol=RTOL)
    # equals 2 - 2 cos, and is scale-invariant in both arguments
    cos = np.mean(np.sum(_unit(p) * _unit(z), axis=1))
    assert math.isclose(normalized_mse_loss(_t(3 * p), _t(0.1 * z)).item(), 2 - 2 * cos, rel_tol=1e-9)


def test_simsiam_negative_cosine_matches_formula():
    rng = _rng(6)
    p, z = rng.normal(size=(7, 6)), rng.normal(size=(7, 6))
    ref = -np.mean([p[b] @ z[b] / (np.linalg.norm(p[b]) * np.linalg.norm(z[b])) for b in range(7)])
    assert math.isclose(negative_cosine_loss(_t(p), _t(z)).item(), ref, rel_tol=RTOL)
    assert math.isclose(negative_cosine_loss(_t(p), _t(p)).item(), -1.0, rel_tol=1e-12)


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_matches_formula(lambd):
    rng = _rng(7)
    za = rng.normal(size=(9, 5)) * rng.uniform(0.5, 3, size=5) + rng.normal(size=5)
    zb = za @ rng.normal(size=(5, 5)) + 0.1 * rng.normal(size=(9, 5))
    got = barlow_twins_loss(_t(za), _t(zb), lambd)
    assert math.isclose(got.item(), ref_barlow(za, zb, lambd), rel_tol=1e-9)


def test_barlow_identity_views_have_unit_diagonal():
    z = torch.randn(64, 6, dtype=torch.float64)
    c = cross_correlation(z, z, eps=0.0)
    assert torch.allclose(torch.diagonal(c), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("views,globals_", [(2, 2), (5, 2), (3, 1)])
def test_dino_matches_formula(views, globals_):
    rng = _rng(8)
    student = rng.normal(size=(views, 4, 7))
    teacher = rng.normal(size=(globals_, 4, 7))
    center = rng.normal(size=7) * 0.1
    got = dino_loss(_t(student), _t(teacher), _t(center), 0.1, 0.04)
    assert math.isclose(got.item(), ref_dino(student, teacher, center, 0.1, 0.04), rel_tol=1e-9)


def test_dino_teacher_temperature_may_be_a_tensor():
    s, t, c = torch.randn(3, 4, 5), torch.randn(2, 4, 5), torch.zeros(5)
    assert torch.allclose(dino_loss(s, t, c, 0.1, torch.tensor(0.04)), dino_loss(s, t, c, 0.1, 0.04))


def test_dino_centering_and_sharpening():
    t = torch.tensor([[2.0, 1.0, 0.0]])
    sharp = teacher_probabilities(t, torch.zeros(3), 0.04)
    soft = teacher_probabilities(t, torch.zeros(3), 1.0)
    assert sharp.max() > soft.max()
    # a centre equal to the output makes the teacher uniform
    assert torch.allclose(teacher_probabilities(t, t[0], 0.04), torch.full((1, 3), 1 / 3))
    new = updated_center(torch.ones(3), torch.tensor([3.0, 0.0, 1.0]), 0.9)
    assert torch.allclose(new, torch.tensor([0.9 + 0.3, 0.9, 0.9 + 0.1]))


def test_view_pairs():
    assert view_pairs(2, [0, 1]) == [(0, 1), (1, 0)]
    assert view_pairs(4, [0, 1]) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]


# ---- gradients --------------------------------------------------------------------------------


def _loss_cases():
    g = torch.Generator().manual_seed(9)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # constants are bf16-representable, so the bf16 test below compares like with like
    queue = torch.nn.functional.normalize(r(7, 4), dim=1).bfloat16().double()
    center = (r(5) * 0.1).bfloat16().double()
    scores = torch.tanh(r(3, 5))
    return {
        "info_nce_queue": (lambda q, k: info_nce_loss(q, k, queue.to(q.dtype), 0.2), (r(3, 4), r(3, 4))),
        "info_nce_batch": (lambda q, k: info_nce_loss(q, k, None, 0.5), (r(3, 4), r(3, 4))),
        "nt_xent": (lambda z: nt_xent_loss(z, 0.3), (r(3, 3, 4),)),
        "nce": (lambda s: nce_loss(s, 0.1, 2.0, 20), (scores,)),
        "bank_softmax": (lambda s: bank_softmax_loss(s, torch.tensor([4, 0, 2]), 0.1), (scores,)),
        "byol": (normalized_mse_loss, (r(4, 3), r(4, 3))),
        "simsiam": (negative_cosine_loss, (r(4, 3), r(4, 3))),
        "barlow": (lambda a, b: barlow_twins_loss(a, b, 0.1), (r(6, 3), r(6, 3))),
        "dino": (lambda s, t: dino_loss(s, t, center.to(s.dtype), 0.1, 0.07), (r(3, 2, 5), r(2, 2, 5))),
    }


@pytest.mark.parametrize("name", sorted(_loss_cases()))
def test_gradients_match_finite_differences(name):
    fn, inputs = _loss_cases()[name]
    # only the first input is differentiated: the second of each pair is a stop-gradient target
    first = inputs[0].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, *inputs[1:]), (first,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["info_nce_queue", "info_nce_batch", "byol", "simsiam", "dino"])
def test_stop_gradient_on_targets(name):
    """Keys, BYOL/SimSiam targets and the DINO teacher get no gradient; the prediction does."""
    fn, inputs = _loss_cases()[name]
    pred, target = (x.clone().requires_grad_() for x in inputs)
    fn(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None


def test_no_gradient_into_queue_or_centre():
    q = torch.randn(3, 4, requires_grad=True)
    queue = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    info_nce_loss(q, torch.randn(3, 4), queue).backward()
    assert queue.grad is None and q.grad is not None
    center = torch.zeros(5, requires_grad=True)
    s = torch.randn(3, 2, 5, requires_grad=True)
    dino_loss(s, torch.randn(2, 2, 5), center).backward()
    assert center.grad is None and s.grad is not None


def test_barlow_gradient_flows_into_both_branches():
    """Barlow Twins has no stop-gradient: the loss is symmetric and both branches learn."""
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    barlow_twins_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert math.isclose(barlow_twins_loss(a, b).item(), barlow_twins_loss(b, a).item(), rel_tol=1e-6)


# ---- precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_loss_cases()))
def test_float32_maths_under_bf16_autocast(name):
    """bf16 inputs under autocast: the loss is float32 and equals the float64 loss of the same
    (bf16-rounded) inputs to float32 accuracy, i.e. no matmul or exp ran in bf16."""
    fn, inputs = _loss_cases()[name]
    low = [x.to(torch.bfloat16) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*low)
    assert got.dtype == torch.float32
    want = fn(*[x.double() for x in low])
    assert math.isclose(got.item(), want.item(), rel_tol=2e-5, abs_tol=2e-5)
