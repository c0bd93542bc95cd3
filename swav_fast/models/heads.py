"""Projection head and prototypes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    r"""MLP :math:`z = \operatorname{normalize}(W_2\,\mathrm{ReLU}(\mathrm{BN}(W_1 h)))`.

    ``hidden_dim=0`` gives a single linear layer; the output is L2-normalised (unit sphere).
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
        return F.normalize(self.mlp(h), dim=1, p=2)


class Prototypes(nn.Linear):
    r"""K prototype vectors :math:`c_k`; scores are :math:`z^\top c_k` (cosine, as both are unit-norm).

    A bias-free linear layer whose rows are re-normalised with :meth:`normalize_` every step.
    """

    def __init__(self, dim: int = 128, num_prototypes: int = 3000):
        super().__init__(dim, num_prototypes, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1, p=2))
