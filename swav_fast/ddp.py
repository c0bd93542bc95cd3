"""Data-parallel training of a :class:`~swav_fast.methods.base.Method`: DDP wrapper, SyncBatchNorm,
per-rank state.

* :func:`wrap_method` puts the whole method (forward and loss) under
  :class:`~torch.nn.parallel.DistributedDataParallel`, so gradients are averaged over ranks during
  backward; the wrapper forwards the method's own attributes (``frozen_parameters``, hooks,
  ``trunk``...), so :class:`~swav_fast.step.TrainStep` drives it like the bare method. Buffers are
  *not* broadcast from rank 0 (``broadcast_buffers=False``): per-rank state such as the SwAV queue
  must stay per rank, and batch-norm statistics are either synchronised (SyncBatchNorm) or local.
* :func:`convert_sync_batchnorm` swaps every batch norm for one whose statistics are those of the
  global batch: :class:`torch.nn.SyncBatchNorm` on GPUs, and on the CPU (gloo)
  :class:`CPUSyncBatchNorm`, the same maths with differentiable all-reduces, so CPU multi-process
  runs (and tests) can use ``model.sync_bn``.
* :func:`per_rank_prefixes`, :func:`gather_per_rank`: state that differs between ranks (modules of
  SwAV's :class:`~swav_fast.methods.swav.FeatureQueue`, or any module with ``per_rank_state = True``) is
  gathered from every rank into the checkpoint and restored rank by rank.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from swav_fast.distributed import is_dist, world_size


class MethodDDP(DistributedDataParallel):
    """DDP over a whole method; unknown attributes are looked up on the wrapped method."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def wrap_method(method: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> MethodDDP:
    """``method`` under DDP (gradients averaged over ranks; buffers left per rank, also at start)."""
    with warnings.catch_warnings():
        # torch suggests forward_sync_buffers=False instead, which still broadcasts buffers at
        # construction; broadcast_buffers=False is the setting that never touches per-rank buffers.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return MethodDDP(method, device_ids=[device.index] if device.type == "cuda" else None,
                         broadcast_buffers=False, find_unused_parameters=find_unused_parameters)


# -- SyncBatchNorm ---------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum over ranks of the output grads."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch norm over the global batch on the CPU (gloo), where torch's SyncBatchNorm refuses to run.

    In training mode under a process group, with :math:`N = \sum_r n_r` values per channel over all
    ranks:

    .. math::
        \mu = \frac{1}{N}\sum_r \sum_{i \in r} x_i, \qquad
        \sigma^2 = \frac{1}{N}\sum_r \sum_{i \in r} (x_i - \mu)^2, \qquad
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    Both sums go through differentiable all-reduces (the backward of a sum all-reduce is a sum
    all-reduce of the gradients), so each rank's gradient includes the other ranks' terms exactly
    as in one process over the concatenated batch. Running statistics use the unbiased
    :math:`\sigma^2 N / (N - 1)`, as ``F.batch_norm`` does. Otherwise (evaluation, one process) it is
    plain batch norm. Any input with channels in dimension 1 (``[B, C]``, ``[B, C, H, W]``...).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        group = self.process_group or dist.group.WORLD
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float()  # statistics in float32 whatever the input dtype
        count = torch.tensor([input.numel() // channels], dtype=torch.float32)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = totals[-1].detach()
        if float(n) <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(n)} in all")
        mean = totals[:channels] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cpu",
                           process_group: Any = None) -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``module`` by a synchronised one sharing its parameters and
    buffers (the same tensor objects): :class:`torch.nn.SyncBatchNorm` on GPUs,
    :class:`CPUSyncBatchNorm` on the CPU. Returns the (possibly new) root module."""
    bn_types = (nn.modules.batchnorm._BatchNorm,)
    if isinstance(module, bn_types) and not isinstance(module, (nn.SyncBatchNorm, CPUSyncBatchNorm)):
        cls = CPUSyncBatchNorm if torch.device(device).type == "cpu" else nn.SyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, device, process_group)
        if new is not child:
            setattr(module, name, new)
    return module


# -- per-rank state --------------------------------------------------------------------------------
def per_rank_prefixes(method: nn.Module) -> list[str]:
    """State-dict prefixes (``"objective.queue."``) of the modules whose state is per rank."""
    return [f"{name}." for name, m in method.named_modules()
            if name and getattr(m, "per_rank_state", False)]


def split_per_rank(state: dict[str, Any], prefixes: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``state`` as ``(shared, per_rank)`` by key prefix."""
    shared, own = {}, {}
    for k, v in state.items():
        (own if any(k.startswith(p) for p in prefixes) else shared)[k] = v
    return shared, own


def reset_per_rank(method: nn.Module) -> list[str]:
    """Empty every per-rank module (``reset()``, else zeroed buffers); returns their prefixes."""
    prefixes = per_rank_prefixes(method)
    modules = dict(method.named_modules())
    for p in prefixes:
        m = modules[p[:-1]]
        if hasattr(m, "reset"):
            m.reset()
        else:
            for b in m.buffers():
                b.zero_()
    return prefixes


def gather_per_rank(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``state`` (the same keys and shapes on all ranks), as CPU tensors, on every rank.

    A collective: all ranks must call it together. In one process: ``[state]`` on the CPU.
    """
    if not is_dist():
        return [{k: v.detach().cpu() for k, v in state.items()}]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size())]
    for key in sorted(state):
        t = state[key].detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t)
        for r, part in enumerate(parts):
            out[r][key] = part.cpu()
    return out
