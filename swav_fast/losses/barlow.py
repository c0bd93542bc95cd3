"""Barlow Twins: the cross-correlation of two views' embeddings pushed towards the identity."""
from __future__ import annotations

import torch

from swav_fast.losses.contrastive import full_precision


@full_precision
def batch_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r""":math:`\hat z_{b,i} = (z_{b,i} - \mu_i)/\sqrt{\sigma_i^2 + \varepsilon}` over the batch
    (biased variance, as a BatchNorm without affine parameters in training mode)."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


@full_precision
def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r""":math:`C_{ij} = \frac{1}{B}\sum_b \hat z^A_{b,i}\,\hat z^B_{b,j}` of batch-standardised
    embeddings, ``[D, D]``."""
    return batch_standardize(z_a, eps).t() @ batch_standardize(z_b, eps) / z_a.shape[0]


@full_precision
def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3,
                      eps: float = 1e-5) -> torch.Tensor:
    r"""Redundancy reduction (Zbontar et al., 2021).

    With :math:`C` the cross-correlation of the batch-standardised embeddings
    (:func:`cross_correlation`):

    .. math:: \mathcal{L} = \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \neq i} C_{ij}^2

    Args:
        z_a, z_b: ``[B, D]`` projector outputs of two views of the same B samples (B > 1).
        lambd: weight :math:`\lambda` of the off-diagonal (redundancy) term; the paper uses 5e-3.
        eps: added to the per-dimension variance.
    Returns:
        float32 scalar.
    """
    c = cross_correlation(z_a, z_b, eps)
    diag = torch.diagonal(c)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag
