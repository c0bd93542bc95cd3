"""Barlow Twins (Zbontar et al., 2021): cross-correlation of two views' embeddings towards the identity."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from swav_fast.distributed import sum_over_ranks
from swav_fast.losses.barlow import barlow_twins_loss
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import BarlowTwinsConfig, method_config, num_global_views
from swav_fast.models.predictor import EncoderNet, MLPHead


def barlow_pairs(num_views: int, num_globals: int) -> list[tuple[int, int]]:
    """Unordered pairs ``(i, j), i < j`` with ``i`` a global view (the loss is symmetric in i, j)."""
    return [(i, j) for i in range(min(num_globals, num_views)) for j in range(i + 1, num_views)]


class BarlowTwins(Method):
    r"""Trunk + projector (8192-8192-8192 in the paper); the loss averages
    :func:`~swav_fast.losses.barlow.barlow_twins_loss` over the pairs of :func:`barlow_pairs`
    (for two views, the paper's single pair)."""

    name = "barlow_twins"

    def __init__(self, model: EncoderNet, num_globals: int = 2, lambd: float = 5e-3):
        super().__init__()
        self.model = model
        self.num_globals = num_globals
        self.lambd = lambd

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        z = self.model(views)
        z = per_view(z, len(views))
        pairs = barlow_pairs(len(views), self.num_globals)
        # batch statistics and the cross-correlation over the global batch (sums over ranks)
        return sum(barlow_twins_loss(z[i], z[j], self.lambd, batch_sum=sum_over_ranks)
                   for i, j in pairs) / len(pairs)


@register_method("barlow_twins", optim="exclude_bias_and_norm", heads=(8192, 8192), config=BarlowTwinsConfig,
                 paper="Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
                 state="nothing besides the online network",
                 ddp="the cross-correlation and the batch statistics summed over ranks; nothing per rank")
def build_barlow_twins(cfg: Any) -> BarlowTwins:
    mc = method_config(cfg, "barlow_twins")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "barlow_twins")
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers,
                                                 last_bias=False))
    return BarlowTwins(model, num_global_views(cfg), mc.lambd)
