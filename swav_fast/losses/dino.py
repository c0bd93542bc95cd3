"""DINO: self-distillation of a centred, sharpened teacher into the student over multi-crop views."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from swav_fast.losses.contrastive import full_precision


@full_precision
def teacher_probabilities(teacher: torch.Tensor, center: torch.Tensor,
                          temperature: torch.Tensor | float) -> torch.Tensor:
    r"""Centring and sharpening: :math:`P_t = \operatorname{softmax}((g_t - c)/\tau_t)` along the
    last dimension, float32, without gradient."""
    return F.softmax((teacher.detach() - center.detach()) / temperature, dim=-1)


@full_precision
def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: torch.Tensor | float = 0.04) -> torch.Tensor:
    r"""Cross-entropy between the teacher's distributions on the global views and the student's on
    every other view.

    ``student`` is ``[V, B, K]`` (globals first), ``teacher`` ``[G, B, K]`` (the G global views),
    ``center`` ``[K]``. With :math:`P_t^{(g)} = \operatorname{softmax}((t_g - c)/\tau_t)` and
    :math:`P_s^{(v)} = \operatorname{softmax}(s_v/\tau_s)`, averaged over the
    :math:`P = G(V-1)` pairs (the paper's Eq. 3 sums them; its code averages):

    .. math:: \mathcal{L} = \frac{1}{P}\sum_{g=1}^{G}\sum_{v \neq g} -\frac{1}{B}\sum_b
              \sum_k P_t^{(g)}[b,k]\,\log P_s^{(v)}[b,k]

    No gradient flows into the teacher or the centre.

    Returns:
        float32 scalar.
    """
    num_globals, num_views = teacher.shape[0], student.shape[0]
    if num_views < 2 or num_globals > num_views:
        raise ValueError(f"dino_loss needs the teacher's {num_globals} views to be among the student's "
                         f"{num_views} views, and at least 2 student views")
    p_t = teacher_probabilities(teacher, center, teacher_temp)  # G x B x K
    log_p_s = F.log_softmax(student / student_temp, dim=-1)  # V x B x K
    cross = -torch.einsum("gbk,vbk->gv", p_t, log_p_s) / student.shape[1]  # G x V
    keep = torch.ones_like(cross)
    keep[torch.arange(num_globals), torch.arange(num_globals)] = 0.0
    return (cross * keep).sum() / (num_globals * (num_views - 1))


@full_precision
def updated_center(center: torch.Tensor, batch_center: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    r"""The centre's EMA: :math:`c \leftarrow m\,c + (1 - m)\,\bar g`, where :math:`\bar g` is the
    mean teacher output over the (global) batch and the global views."""
    return center * momentum + batch_center.to(center.dtype) * (1.0 - momentum)
