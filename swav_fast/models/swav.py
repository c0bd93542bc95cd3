"""SwAV network: trunk, projection head and prototypes over multi-crop views."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from swav_fast.models.heads import ProjectionHead, Prototypes
from swav_fast.models.trunks import build_trunk


def resolution_groups(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` ranges of consecutive views with the same spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropNet(nn.Module):
    """Trunk + projection head; the trunk runs once per resolution (same-size crops concatenated)."""

    def __init__(self, arch: str = "resnet50", hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.trunk = build_trunk(arch)
        self.feature_dim: int = self.trunk.feature_dim
        self.head = ProjectionHead(self.feature_dim, hidden_dim, out_dim)

    def features(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Trunk features of all views, ``[V*B, feature_dim]``, in view order."""
        feats = [self.trunk(torch.cat(list(views[a:b]))) for a, b in resolution_groups(views)]
        return torch.cat(feats)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unit-norm embeddings ``[V*B, out_dim]`` of all views, in view order."""
        return self.head(self.features(views))


class SwAVModel(MultiCropNet):
    """MultiCropNet plus prototypes; ``forward`` returns embeddings and prototype scores."""

    def __init__(self, arch: str = "resnet50", hidden_dim: int = 2048, out_dim: int = 128,
                 num_prototypes: int = 3000):
        super().__init__(arch, hidden_dim, out_dim)
        self.prototypes = Prototypes(out_dim, num_prototypes)

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        z = super().forward(views)
        return z, self.prototypes(z)
