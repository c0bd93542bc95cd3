"""SimSiam (Chen & He, 2021): predictor + stop-gradient, negative cosine, no momentum encoder."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from swav_fast.losses.contrastive import view_pairs
from swav_fast.losses.regression import negative_cosine_loss
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import SimSiamConfig, method_config, num_global_views
from swav_fast.models.predictor import EncoderNet, MLPHead


class SimSiam(Method):
    r"""One network (trunk + projector + predictor) on all views; targets are its own projections of
    the G global views with the gradient stopped. Over the pairs :math:`(g, v), v \neq g`:

    .. math:: \mathcal{L} = \frac{1}{P}\sum_{(g,v)} \mathcal{D}\big(p_v, \operatorname{sg}(z_g)\big)

    which for two views is the paper's :math:`\frac12\mathcal{D}(p_1, z_2) + \frac12\mathcal{D}(p_2, z_1)`.
    """

    name = "simsiam"

    def __init__(self, model: EncoderNet, num_globals: int = 2):
        super().__init__()
        model.require_predictor("SimSiam")
        self.model = model
        self.num_globals = num_globals

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        num_views, num_globals = len(views), min(self.num_globals, len(views))
        z = self.model(views)
        p = self.model.predictor(z)
        z = per_view(z, num_views)
        p = per_view(p, num_views)
        pairs = view_pairs(num_views, range(num_globals))
        return sum(negative_cosine_loss(p[v], z[g].detach()) for g, v in pairs) / len(pairs)


@register_method("simsiam", optim="all", heads=(2048, 2048), config=SimSiamConfig,
                 paper="Chen & He 2021, Exploring Simple Siamese Representation Learning",
                 state="nothing besides the online network (projector and predictor)",
                 ddp="the loss is per sample (no gather); nothing per rank")
def build_simsiam(cfg: Any) -> SimSiam:
    mc = method_config(cfg, "simsiam")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "simsiam")
    # projector: BN on every layer, the output BN without affine parameters (as the official code)
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers,
                                                 last_batch_norm=True, last_affine=False),
                       predictor=MLPHead(feat, mc.predictor_hidden_dim, feat, 2))
    return SimSiam(model, num_global_views(cfg))
