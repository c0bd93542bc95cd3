"""SimCLR (Chen et al., 2020): NT-Xent over all views of the batch; every other view is a negative."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from swav_fast.losses.contrastive import nt_xent_loss
from swav_fast.methods.base import Method, per_view, register_method
from swav_fast.methods.configs import method_config, require_views
from swav_fast.models.predictor import EncoderNet, MLPHead


class SimCLR(Method):
    """Trunk + projector; the loss is :func:`~swav_fast.losses.contrastive.nt_xent_loss` of all
    views (multi-crop: each view's positives are the other views of its sample)."""

    name = "simclr"

    def __init__(self, model: EncoderNet, temperature: float = 0.1):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        z = self.model(views)
        z = per_view(z, len(views))
        return nt_xent_loss(z, self.temperature)


@register_method("simclr")
def build_simclr(cfg: Any) -> SimCLR:
    mc = method_config(cfg, "simclr")
    require_views(cfg, "simclr", 2)
    m = cfg.model
    model = EncoderNet(m.arch, lambda d: MLPHead(d, m.hidden_dim, m.feat_dim, mc.projector_layers))
    return SimCLR(model, mc.temperature)
