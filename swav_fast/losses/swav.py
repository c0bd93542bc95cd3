"""SwAV's swapped-prediction loss over multi-crop views."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def swapped_prediction_loss(
    scores: torch.Tensor,
    codes: torch.Tensor,
    crops_for_assign: Sequence[int],
    temperature: float = 0.1,
) -> torch.Tensor:
    r"""Each view predicts the codes of the assigned views it is not.

    With scores :math:`s_v \in \mathbb{R}^{B\times K}` for every view v (V views) and codes
    :math:`q_i` for each assigned view i (A of them):

    .. math::
        \mathcal{L} = \frac{1}{A} \sum_{i} \frac{1}{V-1} \sum_{v \neq i}
        -\frac{1}{B} \sum_b \sum_k q_i[b,k] \, \log \operatorname{softmax}(s_v[b] / \tau)[k]

    Args:
        scores: ``[V, B, K]`` prototype scores of all views.
        codes: ``[A, B, K]`` Sinkhorn codes, ``codes[j]`` belongs to view ``crops_for_assign[j]``
            (no gradient flows through them).
        crops_for_assign: which views the codes come from (default the two global crops).
        temperature: softmax temperature :math:`\tau`.
    Returns:
        Scalar loss, float32 (float64 for float64 scores).

    Computed outside autocast: the log-softmax in float32 (float64 stays float64) and the sums over
    :math:`b, k` (``A x V x B x K`` terms, 768k for 2 + 6 views at batch 64 and K = 3000) accumulated in
    float64, so the value keeps float32 accuracy.
    """
    num_views = scores.shape[0]
    dtype = torch.promote_types(scores.dtype, torch.float32)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_p = F.log_softmax(scores.to(dtype) / temperature, dim=-1)  # V x B x K
        q = codes.detach().to(dtype)
        # cross[j, v] = -mean_b sum_k q_j log p_v, accumulated in float64
        cross = -torch.einsum("abk,vbk->av", q.double(), log_p.double()) / scores.shape[1]
        keep = torch.ones_like(cross)
        for j, view in enumerate(crops_for_assign):
            keep[j, view] = 0.0
        return ((cross * keep).sum() / (num_views - 1) / len(crops_for_assign)).to(dtype)
