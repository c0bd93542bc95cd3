"""Swapped-prediction loss against a direct float64 evaluation of the paper's formula."""
import math

import numpy as np
import pytest
import torch

from swav_fast.losses import swapped_prediction_loss


def reference_loss(scores, codes, assign, temperature):
    """(1/A) sum_i (1/(V-1)) sum_{v != i} -(1/B) sum_b sum_k q_i[b,k] log softmax(s_v[b]/T)[k]."""
    v_count, b_count, _ = scores.shape
    total = 0.0
    for j, i in enumerate(assign):
        sub = 0.0
        for v in range(v_count):
            if v == i:
                continue
            acc = 0.0
            for b in range(b_count):
                x = scores[v, b] / temperature
                log_p = x - (np.log(np.sum(np.exp(x - x.max()))) + x.max())
                acc += -np.sum(codes[j, b] * log_p)
            sub += acc / b_count
        total += sub / (v_count - 1)
    return total / len(assign)


@pytest.mark.parametrize("assign", [[0, 1], [0], [1, 3]])
def test_matches_formula(assign):
    rng = np.random.default_rng(0)
    v, b, k = 5, 7, 11
    scores = rng.uniform(-1, 1, size=(v, b, k))
    codes = rng.dirichlet(np.ones(k), size=(len(assign), b))
    got = swapped_prediction_loss(torch.tensor(scores, dtype=torch.float32),
                                  torch.tensor(codes, dtype=torch.float32), assign, 0.1)
    assert math.isclose(got.item(), reference_loss(scores, codes, assign, 0.1), rel_tol=1e-5)


def test_gradient_flows_to_scores_not_codes():
    scores = torch.randn(4, 3, 6, requires_grad=True)
    codes = torch.softmax(torch.randn(2, 3, 6), -1).requires_grad_()
    swapped_prediction_loss(scores, codes, [0, 1]).backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert codes.grad is None


def test_uniform_scores_give_log_k():
    """Collapse sign: scores equal for all prototypes give exactly ln K whatever the codes."""
    k = 3000
    loss = swapped_prediction_loss(torch.zeros(8, 4, k), torch.softmax(torch.randn(2, 4, k), -1), [0, 1])
    assert math.isclose(loss.item(), math.log(k), rel_tol=1e-5)
