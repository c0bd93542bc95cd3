"""Contrastive losses: InfoNCE (MoCo v2/v3), NT-Xent (SimCLR), and NCE or the exact non-parametric
softmax over a memory bank (InstDisc).

All similarities are cosines (inputs are L2-normalised here, except stored negatives, which are kept
unit-norm by their queue or bank). Every loss of the family is wrapped in :func:`full_precision`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

LossFn = TypeVar("LossFn", bound=Callable[..., Any])


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.float()
    return x


def full_precision(fn: LossFn) -> LossFn:
    """Run a loss in float32 whatever the caller's autocast: autocast is disabled inside and
    half / bfloat16 tensor arguments are cast to float32 (differentiably). float64 inputs stay
    float64, so tests can compare with a float64 reference to ~1e-12."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def view_pairs(num_views: int, target_views: Sequence[int]) -> list[tuple[int, int]]:
    """Ordered ``(t, v)`` pairs of a multi-crop loss: each target view ``t`` against every other view.

    ``view_pairs(2, [0, 1]) == [(0, 1), (1, 0)]`` (the symmetric two-view loss); with multi-crop the
    targets are the global views and ``v`` runs over globals and locals alike.
    """
    return [(t, v) for t in target_views for v in range(num_views) if v != t]


@full_precision
def info_nce_loss(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor | None = None,
                  temperature: float = 0.2, key_offset: int = 0) -> torch.Tensor:
    r"""InfoNCE of queries against their positive keys.

    With :math:`q_b, k_b` L2-normalised (done here) and temperature :math:`\tau`:

    * ``negatives`` given (MoCo v2: a queue of unit-norm keys :math:`n_j`, ``[K, D]``):

      .. math:: \mathcal{L} = -\frac{1}{B}\sum_b \log
                \frac{\exp(q_b\cdot k_b/\tau)}{\exp(q_b\cdot k_b/\tau) + \sum_j \exp(q_b\cdot n_j/\tau)}

    * ``negatives=None`` (MoCo v3: the other keys of the batch are the negatives):

      .. math:: \mathcal{L} = -\frac{1}{B}\sum_b \log
                \frac{\exp(q_b\cdot k_{o+b}/\tau)}{\sum_c \exp(q_b\cdot k_c/\tau)}

      where ``key`` may hold more rows than ``query`` (under ``torch.distributed``, every rank's
      keys) and query :math:`b`'s positive is key row :math:`o + b` (``key_offset``).

    No gradient flows into ``key`` or ``negatives`` (they come from a momentum encoder).

    Args:
        query: ``[B, D]``. key: ``[B, D]`` positives (``[C, D]``, C >= B, with ``negatives=None``).
        negatives: ``[K, D]`` or None. temperature: :math:`\tau > 0`.
        key_offset: row of ``key`` that is query 0's positive (``negatives=None`` only).
    Returns:
        float32 scalar.
    """
    q = F.normalize(query, dim=1)
    k = F.normalize(key.detach(), dim=1)
    if negatives is None:
        logits = q @ k.t() / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device) + key_offset)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ negatives.detach().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@full_precision
def nt_xent_loss(z: torch.Tensor, temperature: float = 0.1, anchors: slice = slice(None)) -> torch.Tensor:
    r"""SimCLR's normalised-temperature cross entropy over all views of the batch.

    ``z`` is ``[V, B, D]``: V views of B samples, :math:`N = VB` embeddings in all, L2-normalised
    here, :math:`s_{ij} = z_i\cdot z_j / \tau`. Every other view of the same sample is a positive,
    all other :math:`N - 1` embeddings are in the denominator; the anchors :math:`A` are the views
    of the samples in ``anchors`` (default all B):

    .. math:: \mathcal{L} = \frac{1}{|A|(V-1)} \sum_{i \in A} \sum_{p \in P(i)}
              -\log \frac{\exp(s_{ip})}{\sum_{j \neq i} \exp(s_{ij})}

    With V = 2 this is exactly the paper's loss (each of the 2B anchors has one positive and
    2B - 2 negatives); with multi-crop each anchor averages over its V - 1 positives. Under
    ``torch.distributed`` ``z`` holds every rank's samples and ``anchors`` this rank's: the mean of
    the ranks' losses is the loss of the whole batch.

    Returns:
        float32 scalar.
    """
    num_views, batch, dim = z.shape
    if num_views < 2:
        raise ValueError(f"nt_xent_loss needs at least 2 views per sample, got {num_views}")
    flat = F.normalize(z.reshape(num_views * batch, dim), dim=1)
    sample = torch.arange(batch, device=z.device).repeat(num_views)  # sample of each row of flat
    row = torch.arange(num_views * batch, device=z.device).reshape(num_views, batch)
    row = row[:, anchors].reshape(-1)  # the anchors' rows
    logits = flat[row] @ flat.t() / temperature
    itself = row[:, None] == torch.arange(num_views * batch, device=z.device)[None, :]
    logits = logits.masked_fill(itself, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (sample[row][:, None] == sample[None, :]) & ~itself
    # a masked sum, not masked_select: its data-dependent size would synchronise with the host
    return -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum() / positive.sum()


@full_precision
def estimate_log_z(scores: torch.Tensor, temperature: float, num_data: int) -> torch.Tensor:
    r"""InstDisc's Monte-Carlo normaliser, in log space: :math:`\log Z = \log n + \log
    \operatorname{mean}\exp(s/\tau)` over all entries of ``scores`` (cosines to bank entries).

    The paper estimates :math:`Z \approx n\,\mathbb{E}_j[\exp(v_j\cdot f/\tau)]` once (first batch)
    and keeps it fixed.
    """
    s = scores.detach().reshape(-1) / temperature
    return math.log(num_data) + torch.logsumexp(s, dim=0) - math.log(s.numel())


#: lemniscate's ``NCECriterion`` epsilon (added to the denominators :math:`P + m P_n`)
NCE_EPS = 1e-7


@full_precision
def nce_loss(scores: torch.Tensor, temperature: float, log_z: torch.Tensor | float,
             num_data: int, eps: float = NCE_EPS) -> torch.Tensor:
    r"""Noise-contrastive estimation of InstDisc's non-parametric softmax (Wu et al., 2018).

    ``scores`` is ``[B, 1 + m]``: column 0 the cosine of each feature :math:`f_b` to its own memory
    entry :math:`v_{i_b}`, the other m columns to uniformly sampled entries (noise,
    :math:`P_n = 1/n`). With :math:`P(i\mid f) = \exp(v_i\cdot f/\tau)/Z` and
    :math:`h(i, f) = P(i\mid f) / (P(i\mid f) + m P_n + \epsilon)` and
    :math:`1 - h \to m P_n / (P + m P_n + \epsilon)` (the official lemniscate ``NCECriterion``,
    :math:`\epsilon = 10^{-7}`):

    .. math:: \mathcal{L} = -\frac{1}{B}\sum_b \Big[\log h(i_b, f_b)
              + \sum_{j=1}^{m} \log\big(1 - h(j_b, f_b)\big)\Big]

    Evaluated stably in log space with :math:`c = \log(m P_n + \epsilon)`:
    :math:`\log h = \log P - c - \operatorname{softplus}(\log P - c)`,
    :math:`\log(1 - h) = \log(m P_n) - c - \operatorname{softplus}(\log P - c)`
    (with :math:`\epsilon = 0`, the exact :math:`-\operatorname{softplus}(\pm(\log P - \log m P_n))`).

    Args:
        scores: ``[B, 1 + m]`` cosines, positive first.
        temperature: :math:`\tau`. log_z: :math:`\log Z` (see :func:`estimate_log_z`).
        num_data: the number of rows the noise is drawn from (:math:`P_n = 1/\text{num\_data}`).
        eps: :math:`\epsilon` (lemniscate's 1e-7; 0 = the paper's formula exactly).
    Returns:
        float32 scalar.
    """
    num_noise = scores.shape[1] - 1
    log_p = scores / temperature - log_z
    log_noise = math.log(num_noise / num_data)
    c = math.log(num_noise / num_data + eps)
    log_den = c + F.softplus(log_p - c)  # log(P + m Pn + eps)
    log_h_pos = log_p[:, 0] - log_den[:, 0]
    log_not_h_neg = log_noise - log_den[:, 1:]
    return -(log_h_pos + log_not_h_neg.sum(dim=1)).mean()


@full_precision
def bank_softmax_loss(scores: torch.Tensor, targets: torch.Tensor, temperature: float,
                      return_log_z: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""InstDisc's non-parametric softmax computed exactly over the whole memory bank (Wu et al. 2018,
    eq. 2, which NCE approximates when the bank is too large to score):

    .. math:: P(i\mid f) = \frac{\exp(v_i\cdot f/\tau)}{Z(f)}, \quad Z(f) = \sum_{j=1}^{n}\exp(v_j\cdot f/\tau),
              \qquad \mathcal{L} = \frac{1}{VB}\sum_{v,b} \big(\log Z(f_{vb}) - v_{i_b}\cdot f_{vb}/\tau\big)

    Args:
        scores: ``[..., B, n]`` cosines of each feature :math:`f_b` to every bank entry :math:`v_j`
            (leading dims, e.g. views, share the targets and are averaged over).
        targets: ``[B]`` each feature's own row :math:`i_b`.
        temperature: :math:`\tau`.
        return_log_z: also return the ``[..., B]`` normalisers :math:`\log Z(f)` of the same pass
            (detached), so a caller that logs them does not score the bank twice.
    Returns:
        float32 scalar, or ``(loss, log_z)``.
    """
    logits = scores / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    index = targets.reshape(*([1] * (logits.dim() - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    loss = (log_z - logits.gather(-1, index).squeeze(-1)).mean()
    return (loss, log_z.detach()) if return_log_z else loss
