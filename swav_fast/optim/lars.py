"""LARS: SGD with momentum whose step is scaled per layer by a trust ratio.

Two conventions for biases and normalisation weights, declared by each method
(``register_method(..., optim=...)``, used when ``optim.exclude_bias_and_norm=auto``):

- ``all``: LARS over every parameter, biases and BN weights included, weight decay on all. Official
  SwAV (apex ``LARC(SGD(model.parameters()), trust_coefficient=0.001, clip=False)``); InstDisc, MoCo v2
  and SimSiam train with plain SGD and weight decay on all parameters, so ``all`` is their convention
  when LARS is on.
- ``exclude_bias_and_norm``: biases and norm weights (1-d parameters) get neither adaptation nor weight
  decay (SimCLR, BYOL, Barlow Twins, MoCo v3's LARS recipes; DINO's optimiser groups).

The quick CPU recipes of InstDisc, MoCo v2 and SimSiam set ``exclude_bias_and_norm: true`` explicitly
(their learning tests were tuned with it); the paper recipes of SwAV take the official ``all``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.optim import Optimizer


class LARS(Optimizer):
    r"""Layer-wise adaptive rate scaling around SGD with momentum (as SwAV's apex LARC, no clipping).

    For a parameter :math:`w` with gradient :math:`g` in a group with weight decay :math:`\lambda`:

    .. math::
        \eta = \frac{\text{trust} \cdot \lVert w \rVert}{\lVert g \rVert + \lambda \lVert w \rVert + \epsilon},
        \qquad d = \eta\,(g + \lambda w) \quad (d = g \text{ if a norm is } 0),\\
        m \leftarrow \mu\, m + d, \qquad w \leftarrow w - \text{lr}\cdot m

    Groups with ``lars_exclude=True`` (biases, norm layers) get neither adaptation nor weight decay:
    :math:`d = g`. No host synchronisation: the step can be captured in a CUDA graph, and ``lr`` may
    be a 0-d tensor.
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-6, trust_coefficient: float = 0.001, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    #: No host synchronisation and no data-dependent Python branch in :meth:`step` once the momentum
    #: buffers exist: a step can be captured in a CUDA graph (``lr`` then a 0-d device tensor).
    capturable = True

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update; a handful of multi-tensor kernels per (device, dtype) of a group, whatever the
        number of parameters (trust ratios applied to one flat buffer, not one kernel per parameter)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for same in _by_device_and_dtype(params):
                self._update(same, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        grads = [p.grad for p in params]
        updates = grads if group["lars_exclude"] else self._adapted(params, grads, group)
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, updates)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # a device tensor: read by the kernels, not the host
            torch._foreach_add_(params, torch._foreach_mul(bufs, -lr))
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)

    def _adapted(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                 group: dict) -> list[torch.Tensor]:
        """``d = ratio * (g + wd * w)`` per parameter, the ratios computed for all at once and applied to
        one flat buffer (``ratio`` repeated ``numel`` times per parameter).

        Where a norm is zero apex LARC leaves ``g`` untouched: ``ratio = 1`` when ``w = 0`` (then
        ``g + wd*w = g``) and ``ratio = 0`` when ``g = 0`` (then ``d = 0 = g``).
        """
        wd, eps, trust = group["weight_decay"], group["eps"], group["trust_coefficient"]
        p_norms = torch.stack(torch._foreach_norm(params))
        g_norms = torch.stack(torch._foreach_norm(grads))
        ok = (p_norms > 0) & (g_norms > 0)
        ratios = torch.where(ok, trust * p_norms / (g_norms + wd * p_norms + eps),
                             (g_norms > 0).to(p_norms.dtype))
        updates = torch._foreach_add(grads, params, alpha=wd)
        flat = torch.cat([u.reshape(-1) for u in updates])
        numels = [u.numel() for u in updates]
        flat.mul_(torch.repeat_interleave(ratios.to(flat.dtype), self._repeats(numels, flat.device),
                                          output_size=flat.numel()))
        return [f.view(u.shape) for f, u in zip(flat.split(numels), updates)]

    def _repeats(self, numels: list[int], device: torch.device) -> torch.Tensor:
        """The parameters' sizes as a device tensor, built once per parameter set (not saved)."""
        cache = self.__dict__.setdefault("_repeats_cache", {})
        key = (tuple(numels), device)
        if key not in cache:
            # non-blocking: a staged copy from pageable memory, no stream synchronisation
            cache[key] = torch.tensor(numels, dtype=torch.long).to(device, non_blocking=True)
        return cache[key]


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` split by (device, dtype), first-seen order (one multi-tensor launch each)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def is_excluded(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation parameters (1-d tensors) skip LARS adaptation and weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def lars_param_groups(model: nn.Module, exclude_bias_and_norm: bool = True) -> list[dict]:
    """Two groups: adapted (weights) and excluded (biases, BN/LN) parameters."""
    adapted, excluded = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (excluded if exclude_bias_and_norm and is_excluded(name, p) else adapted).append(p)
    groups = [{"params": adapted}]
    if excluded:
        groups.append({"params": excluded, "lars_exclude": True, "weight_decay": 0.0})
    return groups
