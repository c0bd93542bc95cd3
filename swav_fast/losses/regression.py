"""Regression losses without negatives: BYOL's normalised MSE and SimSiam's negative cosine.

Both stop the gradient at the target (``target.detach()``): it comes from a target network (BYOL)
or from the other branch of the same network (SimSiam), and only the prediction is trained.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from swav_fast.losses.contrastive import full_precision


@full_precision
def normalized_mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""BYOL: mean squared error between L2-normalised prediction and (stop-gradient) target.

    .. math:: \mathcal{L} = \frac{1}{B}\sum_b \Big\| \frac{p_b}{\|p_b\|} - \frac{z_b}{\|z_b\|}\Big\|_2^2
              = \frac{1}{B}\sum_b \Big(2 - 2\,\frac{p_b\cdot z_b}{\|p_b\|\,\|z_b\|}\Big)

    Args:
        prediction: ``[B, D]`` online predictions :math:`p`. target: ``[B, D]`` target projections
            :math:`z` (no gradient flows into them).
    Returns:
        float32 scalar in [0, 4].
    """
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()


@full_precision
def negative_cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""SimSiam: :math:`\mathcal{D}(p, z) = -\frac{1}{B}\sum_b \frac{p_b}{\|p_b\|}\cdot
    \frac{\operatorname{sg}(z_b)}{\|z_b\|}` (negative cosine, stop-gradient on z).

    Returns:
        float32 scalar in [-1, 1].
    """
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return -(p * z).sum(dim=1).mean()
