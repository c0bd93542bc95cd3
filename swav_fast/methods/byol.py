"""BYOL (Grill et al., 2020): the online network predicts an EMA target network's projection."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from swav_fast.losses.contrastive import view_pairs
from swav_fast.losses.regression import normalized_mse_loss
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import BYOLConfig, estimated_total_steps, method_config, num_global_views
from swav_fast.methods.momentum import EMATarget
from swav_fast.models.predictor import EncoderNet, MLPHead


class BYOL(Method):
    r"""Online trunk + projector + predictor; target trunk + projector by EMA (0.996 -> 1, cosine).

    The target sees the G global views, the online branch all V views; over the pairs
    :math:`(g, v), v \neq g` (:func:`~swav_fast.losses.contrastive.view_pairs`):

    .. math:: \mathcal{L} = \frac{2}{P}\sum_{(g,v)} \big\|\bar p_v - \bar z^{\xi}_g\big\|^2

    which for two views is the paper's symmetrised :math:`\mathcal{L} + \tilde{\mathcal{L}}`.
    """

    name = "byol"

    def __init__(self, model: EncoderNet, num_globals: int = 2, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, total_steps: int = 0):
        super().__init__()
        model.require_predictor("BYOL")
        self.model = model
        self.target = EMATarget(model, base_momentum, final_momentum, total_steps, drop=("predictor",))
        self.num_globals = num_globals

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        num_views, num_globals = len(views), min(self.num_globals, len(views))
        z = self.model(views)
        p = self.model.predictor(z)
        p = per_view(p, num_views)
        t = self.target(views[:num_globals])
        t = per_view(t, num_globals)
        pairs = view_pairs(num_views, range(num_globals))
        return sum(normalized_mse_loss(p[v], t[g]) for g, v in pairs) * (2.0 / len(pairs))

    def after_update(self, step: torch.Tensor) -> None:
        self.target.update_(self.model, step)

    def on_train_start(self, num_samples: int, total_steps: int) -> None:
        self.target.schedule.set_total_steps(total_steps)


@register_method("byol", optim="exclude_bias_and_norm", heads=(4096, 256), config=BYOLConfig,
                 paper="Grill et al. 2020, Bootstrap Your Own Latent",
                 state="the EMA target network (trunk + projector) and its momentum schedule",
                 ddp="the loss is per sample (no gather); target updated identically on every rank")
def build_byol(cfg: Any) -> BYOL:
    mc = method_config(cfg, "byol")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "byol")
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers),
                       predictor=MLPHead(feat, mc.predictor_hidden_dim, feat, 2))
    return BYOL(model, num_global_views(cfg), mc.base_momentum, mc.final_momentum, estimated_total_steps(cfg))
