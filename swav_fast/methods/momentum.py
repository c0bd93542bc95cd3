"""Target networks updated by an exponential moving average of the online network.

Shared by MoCo v2/v3 (key encoder), BYOL (target network) and DINO (teacher). Everything that runs
per step is a tensor op on the training device (no ``.item()``, no Python branch on a tensor), so
the update can be replayed inside a CUDA graph.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
import torch.nn as nn

from swav_fast.errors import ConfigError


def cosine_momentum(step: torch.Tensor, total_steps: torch.Tensor | int, base: float,
                    final: float = 1.0) -> torch.Tensor:
    r"""BYOL's schedule: :math:`m_k = m_{final} - (m_{final} - m_{base})\,\frac{\cos(\pi k / K) + 1}{2}`.

    ``k`` (``step``) is clamped to ``[0, K]``; ``K <= 0`` (unknown) gives :math:`m_{base}`
    throughout. ``base == final`` gives a constant (MoCo v2). Returns a float32 0-d tensor on
    ``step``'s device.
    """
    step = torch.as_tensor(step).to(torch.float32)
    total = torch.as_tensor(total_steps, device=step.device).to(torch.float32)
    progress = torch.where(total > 0, step.clamp(min=0) / total.clamp(min=1), torch.zeros_like(step))
    progress = progress.clamp(max=1.0)
    return final - (final - base) * (torch.cos(math.pi * progress) + 1.0) / 2.0


class MomentumSchedule(nn.Module):
    """:func:`cosine_momentum` with ``K`` held in a buffer (set once the loader's length is known)."""

    def __init__(self, base: float, final: float = 1.0, total_steps: int = 0):
        super().__init__()
        if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
            raise ConfigError(f"EMA momentum must be in [0, 1], got base={base}, final={final}")
        self.base, self.final = base, final
        self.register_buffer("total_steps", torch.tensor(int(total_steps), dtype=torch.long))

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps.fill_(int(total_steps))

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        return cosine_momentum(step.to(self.total_steps.device), self.total_steps, self.base, self.final)


def make_target(online: nn.Module, drop: Iterable[str] = ()) -> nn.Module:
    """A frozen deep copy of ``online`` (``requires_grad=False``), with the sub-modules named in
    ``drop`` (e.g. the predictor, which only the online branch has) set to None."""
    target = copy.deepcopy(online)
    for name in drop:
        setattr(target, name, None)
    target.requires_grad_(False)
    return target


def paired_parameters(target: nn.Module, online: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters of ``target`` and the same-named ones of ``online`` (online-only ones are skipped)."""
    online_params = dict(online.named_parameters())
    t_list, o_list = [], []
    for name, p in target.named_parameters():
        if name not in online_params:
            raise KeyError(f"target parameter {name!r} has no online counterpart")
        o = online_params[name]
        if o.shape != p.shape:
            raise ValueError(f"target parameter {name!r} has shape {tuple(p.shape)}, online {tuple(o.shape)}")
        t_list.append(p)
        o_list.append(o)
    return t_list, o_list


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: torch.Tensor | float) -> None:
    r"""In place, for every parameter of ``target``:
    :math:`\theta_t \leftarrow m\,\theta_t + (1 - m)\,\theta_o` (same-named online parameter).

    Buffers (batch-norm running statistics) are not averaged: each network keeps its own, updated by
    its own forward passes in training mode, as in MoCo, BYOL and DINO. ``momentum`` may be a 0-d
    tensor (from :class:`MomentumSchedule`), so the update needs no host synchronisation.
    """
    t_list, o_list = paired_parameters(target, online)
    if not t_list:
        return
    by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for t, o in zip(t_list, o_list):
        ts, os_ = by_dtype.setdefault(t.dtype, ([], []))
        ts.append(t)
        os_.append(o.detach())
    for dtype, (ts, os_) in by_dtype.items():
        weight = 1.0 - torch.as_tensor(momentum, device=ts[0].device).to(dtype)
        # theta_t += (1 - m) (theta_o - theta_t): the weight multiplies as a device tensor (the
        # _foreach_lerp_ overload for one weight takes a Python scalar: a host read of m every step)
        diff = torch._foreach_sub(os_, ts)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(ts, diff)


class EMATarget(nn.Module):
    """A target network (MoCo's key encoder, BYOL's target, DINO's teacher) and its momentum schedule.

    ``forward`` runs the target without gradient; :meth:`update_` moves it towards the online network
    by :func:`ema_update_` with momentum ``schedule(step)``.

    Args:
        online: the network to copy (its current weights initialise the target).
        base, final: momentum at step 0 and at ``total_steps`` (cosine in between; equal = constant).
        total_steps: K of the schedule (0 until known: ``base`` throughout).
        drop: online-only sub-modules left out of the copy (e.g. ``("predictor",)``).
    """

    def __init__(self, online: nn.Module, base: float, final: float = 1.0, total_steps: int = 0,
                 drop: Iterable[str] = ()):
        super().__init__()
        self.net = make_target(online, drop)
        self.schedule = MomentumSchedule(base, final, total_steps)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.net(*args, **kwargs)

    def update_(self, online: nn.Module, step: torch.Tensor) -> None:
        ema_update_(self.net, online, self.schedule(step))
