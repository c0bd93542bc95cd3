"""Barlow Twins: the cross-correlation of two views' embeddings pushed towards the identity."""
from __future__ import annotations

from typing import Callable

import torch

from swav_fast.losses.contrastive import full_precision


BatchSum = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def _count(z: torch.Tensor, batch_sum: BatchSum) -> torch.Tensor:
    """Rows of the (global) batch, ``[1, 1]``."""
    return batch_sum(z.new_full((1, 1), float(z.shape[0])))


def _standardize(z: torch.Tensor, eps: float, batch_sum: BatchSum, count: torch.Tensor) -> torch.Tensor:
    mean = batch_sum(z.sum(dim=0, keepdim=True)) / count
    var = batch_sum((z - mean).pow(2).sum(dim=0, keepdim=True)) / count
    return (z - mean) / torch.sqrt(var + eps)


@full_precision
def batch_standardize(z: torch.Tensor, eps: float = 1e-5, batch_sum: BatchSum = _no_reduce) -> torch.Tensor:
    r""":math:`\hat z_{b,i} = (z_{b,i} - \mu_i)/\sqrt{\sigma_i^2 + \varepsilon}` over the batch
    (biased variance, as a BatchNorm without affine parameters in training mode).

    ``batch_sum`` adds a per-process sum over every process's part of the batch
    (:func:`swav_fast.distributed.sum_over_ranks`), so that :math:`\mu, \sigma` are those of the
    global batch; the default keeps them this process's."""
    return _standardize(z, eps, batch_sum, _count(z, batch_sum))


@full_precision
def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-5,
                      batch_sum: BatchSum = _no_reduce) -> torch.Tensor:
    r""":math:`C_{ij} = \frac{1}{B}\sum_b \hat z^A_{b,i}\,\hat z^B_{b,j}` of batch-standardised
    embeddings, ``[D, D]``; with ``batch_sum`` (see :func:`batch_standardize`) :math:`B` and the sum
    run over the global batch."""
    count = _count(z_a, batch_sum)  # one batch size for both views' statistics and the mean
    local = _standardize(z_a, eps, batch_sum, count).t() @ _standardize(z_b, eps, batch_sum, count)
    return batch_sum(local) / count


@full_precision
def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3,
                      eps: float = 1e-5, batch_sum: BatchSum = _no_reduce) -> torch.Tensor:
    r"""Redundancy reduction (Zbontar et al., 2021).

    With :math:`C` the cross-correlation of the batch-standardised embeddings
    (:func:`cross_correlation`):

    .. math:: \mathcal{L} = \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \neq i} C_{ij}^2

    Args:
        z_a, z_b: ``[B, D]`` projector outputs of two views of the same B samples (B > 1).
        lambd: weight :math:`\lambda` of the off-diagonal (redundancy) term; the paper uses 5e-3.
        eps: added to the per-dimension variance.
        batch_sum: sums a tensor over every process's part of the batch (default: this process
            only); :func:`swav_fast.distributed.sum_over_ranks` makes the loss that of the global batch.
    Returns:
        float32 scalar.
    """
    c = cross_correlation(z_a, z_b, eps, batch_sum)
    diag = torch.diagonal(c)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag
