"""Projection head and prototypes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def prototype_scores(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    r"""SwAV's scores :math:`s = z\,C^\top` (``[N, D] x [K, D] -> [N, K]``) in float32 whatever the
    autocast dtype (float64 stays float64): Sinkhorn's :math:`\exp(s/\varepsilon)` with
    :math:`\varepsilon = 0.05` and the swapped prediction need them at float32 accuracy (in bf16 the
    scores are off by ~3% relative, and so are the codes). Gradients flow into both operands."""
    dtype = _compute_dtype(torch.promote_types(z.dtype, weight.dtype))
    with torch.autocast(device_type=z.device.type, enabled=False):
        return z.to(dtype) @ weight.to(dtype).t()


class ProjectionHead(nn.Module):
    r"""MLP :math:`z = \operatorname{normalize}(W_2\,\mathrm{ReLU}(\mathrm{BN}(W_1 h)))`.

    ``hidden_dim=0`` gives a single linear layer; the output is L2-normalised (unit sphere), the
    normalisation in float32 whatever the autocast dtype (the embeddings feed SwAV's float32 scores).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        if hidden_dim > 0:
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )
        else:
            self.mlp = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.mlp(h)
        with torch.autocast(device_type=y.device.type, enabled=False):
            return F.normalize(y.to(_compute_dtype(y.dtype)), dim=1, p=2)


class Prototypes(nn.Linear):
    r"""K prototype vectors :math:`c_k`; scores are :math:`z^\top c_k` (cosine, as both are unit-norm).

    A bias-free linear layer whose rows are re-normalised with :meth:`normalize_` every step; the
    scores are computed in float32 under autocast (:func:`prototype_scores`).
    """

    def __init__(self, dim: int = 128, num_prototypes: int = 3000):
        super().__init__(dim, num_prototypes, bias=False)
        self.normalize_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return prototype_scores(z, self.weight)

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1, p=2))
