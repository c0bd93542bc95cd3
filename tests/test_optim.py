"""LARS against its formula, parameter groups, and the warmup + cosine schedule."""
import math

import pytest
import torch
import torch.nn as nn

from swav_fast.optim import LARS, lars_param_groups, warmup_cosine_lr


def reference_lars(w, g, buf, lr, mom, wd, trust, eps=1e-8, exclude=False):
    w, g, buf = w.double(), g.double(), buf.double()
    if exclude:
        d = g
    else:
        pn, gn = w.norm(), g.norm()
        d = (g + wd * w) * (trust * pn / (gn + wd * pn + eps)) if pn > 0 and gn > 0 else g
    buf = mom * buf + d
    return w - lr * buf, buf


def test_lars_matches_formula_over_steps():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    opt = LARS(lars_param_groups(lin), lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.01)
    w, b = lin.weight.detach().double().clone(), lin.bias.detach().double().clone()
    bw, bb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(3):
        gw, gb = torch.randn(4, 5), torch.randn(4)
        lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
        opt.step()
        w, bw = reference_lars(w, gw, bw, 0.5, 0.9, 1e-2, 0.01)
        b, bb = reference_lars(b, gb, bb, 0.5, 0.9, 0.0, 0.01, exclude=True)
        torch.testing.assert_close(lin.weight.detach().double(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lin.bias.detach().double(), b, rtol=1e-5, atol=1e-7)


def test_lars_tensor_lr_and_zero_weight():
    p = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([p], lr=torch.tensor(0.1), momentum=0.0, weight_decay=0.1)
    p.grad = torch.ones(3, 3)
    opt.step()  # zero norm: plain SGD step, no adaptation
    torch.testing.assert_close(p.detach(), torch.full((3, 3), -0.1))


def test_many_params_mixed_dtypes_layouts_and_zero_norms_match_the_formula_per_param():
    """The flat (multi-tensor) trust-ratio path equals the per-parameter float64 formula for every
    parameter: several shapes, a channels-last conv weight, a float64 parameter in a float32 group
    (grouped by dtype), a zero weight, a zero gradient, a tensor learning rate, and three steps."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (7, 5), (16,), (2, 2), (3, 4), (6, 6)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params[0] = nn.Parameter(params[0].detach().contiguous(memory_format=torch.channels_last))
    params[1] = nn.Parameter(params[1].detach().double())
    params[3] = nn.Parameter(torch.zeros(2, 2))  # zero weight: ratio 1
    opt = LARS([{"params": params}], lr=torch.tensor(0.3, dtype=torch.float64), momentum=0.9, weight_decay=1e-2,
               trust_coefficient=0.02)
    refs = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64)) for p in params]
    for step in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        grads[4] = torch.zeros(3, 4)  # zero gradient: no step from the gradient
        for p, gr in zip(params, grads):
            p.grad = gr.to(p.dtype)
        opt.step()
        for i, (p, gr) in enumerate(zip(params, grads)):
            w, buf = refs[i]
            refs[i] = reference_lars(w, gr.to(p.dtype), buf, 0.3, 0.9, 1e-2, 0.02)
            tol = dict(rtol=1e-12, atol=1e-14) if p.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p.detach().double(), refs[i][0], **tol, msg=f"param {i}, step {step}")
            momentum = opt.state[p]["momentum_buffer"]
            assert momentum.dtype == p.dtype and momentum.shape == p.shape
            torch.testing.assert_close(momentum.double(), refs[i][1], **tol)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}  # the checkpoint format is unchanged


def test_groups_exclude_bias_and_norm():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = lars_param_groups(m)
    adapted = {id(p) for p in groups[0]["params"]}
    excluded = {id(p) for p in groups[1]["params"]}
    assert adapted == {id(m[0].weight), id(m[2].weight)}
    assert excluded == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[2].bias)}
    assert groups[1]["lars_exclude"] and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("step,expected", [
    (0, 0.3), (4, 0.3 + (4.8 - 0.3) * 4 / 9), (9, 4.8),  # linspace(0.3, 4.8, 10)
    (10, 4.8),  # cosine starts at base
    (55, 0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * 45 / 90))),  # half way: mean of the two
    (99, 0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * 89 / 90))),
])
def test_warmup_cosine(step, expected):
    assert math.isclose(warmup_cosine_lr(step, 100, 10, 4.8, 0.0048, 0.3), expected, rel_tol=1e-12)


def test_no_warmup_and_end():
    assert warmup_cosine_lr(0, 50, 0, 0.6, 0.0006) == 0.6
    assert math.isclose(warmup_cosine_lr(50, 50, 0, 0.6, 0.0006), 0.0006)
    lrs = [warmup_cosine_lr(t, 50, 0, 0.6, 0.0006) for t in range(50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
