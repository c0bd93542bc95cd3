"""MLP heads of the method family: projectors, predictors (BYOL, SimSiam, MoCo v3), DINO's head,
and :class:`EncoderNet`, a :class:`~swav_fast.models.MultiCropNet` with any head and a predictor."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from swav_fast.errors import ConfigError
from swav_fast.models.swav import MultiCropNet

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class MLPHead(nn.Sequential):
    r"""``num_layers`` linear layers; every hidden layer is Linear-[BN]-activation.

    .. math:: h_{l+1} = \sigma(\mathrm{BN}(W_l h_l)) \;(l < L),\qquad y = [\mathrm{BN}](W_L h_L)

    Args:
        in_dim, hidden_dim, out_dim: sizes (``hidden_dim`` unused when ``num_layers == 1``).
        num_layers: >= 1.
        batch_norm: BN after each hidden linear (which then has no bias).
        last_batch_norm: BN after the output linear too (SimSiam's projector, MoCo v3);
            ``last_affine`` whether that BN has a scale and shift.
        activation: ``relu`` or ``gelu``.
        last_bias: bias on the output linear (dropped anyway when ``last_batch_norm``).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True,
                 last_batch_norm: bool = False, last_affine: bool = True, activation: str = "relu",
                 last_bias: bool = True):
        if num_layers < 1:
            raise ConfigError(f"an MLP head needs num_layers >= 1, got {num_layers}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if min(in_dim, out_dim) < 1 or (num_layers > 1 and hidden_dim < 1):
            raise ConfigError(f"MLP head sizes must be >= 1, got in={in_dim} hidden={hidden_dim} "
                              f"out={out_dim}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(ACTIVATIONS[activation]())
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=last_bias and not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
        super().__init__(*layers)


class NormalizedLinear(nn.Module):
    r"""Bias-free linear layer with unit-norm rows: :math:`y = x\,(g \odot \hat V)^\top`,
    :math:`\hat v_k = v_k/\|v_k\|`; the row scales :math:`g` are 1 (DINO's ``norm_last_layer``) or
    learnt (``learn_scale``). A weight-normalised layer without the parametrisation machinery."""

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.scale = (nn.Parameter(self.weight.detach().norm(dim=1, keepdim=True).clone())
                      if learn_scale else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        if self.scale is not None:
            w = w * self.scale
        return F.linear(x, w)


class DINOHead(nn.Module):
    r"""DINO's projection head: MLP to a bottleneck, L2-normalise, weight-normalised linear to K.

    .. math:: g(h) = \hat W\,\frac{\mathrm{MLP}(h)}{\|\mathrm{MLP}(h)\|}

    Args:
        in_dim: trunk features. hidden_dim: MLP width (2048). bottleneck_dim: 256. out_dim: K (65536).
        num_layers: MLP layers (3). batch_norm: BN in the MLP (off in the paper). activation: ``gelu``.
        norm_last_layer: fix the last layer's row norms to 1 (the paper's default, for stability).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 65536,
                 num_layers: int = 3, batch_norm: bool = False, activation: str = "gelu",
                 norm_last_layer: bool = True):
        super().__init__()
        # PyTorch's default Linear init: at the paper's width (2048) its scale is close to the paper's
        # trunc_normal(std=0.02), and unlike a fixed std it keeps narrow (CPU-sized) heads' outputs
        # from shrinking layer by layer towards the (then dominant) biases.
        self.mlp = MLPHead(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm=batch_norm,
                           activation=activation)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(h), dim=1))


class EncoderNet(MultiCropNet):
    """Trunk (run once per crop resolution) + any projection ``head`` + an optional ``predictor``.

    ``forward(views)`` gives the head's outputs ``[V*B, D]`` in view order (not normalised: the
    losses normalise where their formula does); ``predictor`` is applied by the method. State-dict
    keys are ``trunk.*``, ``head.*``, ``predictor.*``, so export finds the trunk as for SwAV.

    Args:
        arch: trunk name (``swav_fast.models.build_trunk``).
        head: builds the head from the trunk's feature size.
        predictor: the online branch's predictor, or None.
    """

    def __init__(self, arch: str, head: Callable[[int], nn.Module], predictor: nn.Module | None = None):
        super().__init__(arch, hidden_dim=0, out_dim=1)  # the placeholder head is replaced below
        self.head = head(self.feature_dim)
        self.predictor = predictor

    def forward(self, views) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.features(views))

    def require_predictor(self, method: str) -> nn.Module:
        """The predictor; ValueError naming ``method`` when this network was built without one."""
        if self.predictor is None:
            raise ValueError(f"{method} needs an online predictor (EncoderNet(..., predictor=...))")
        return self.predictor
