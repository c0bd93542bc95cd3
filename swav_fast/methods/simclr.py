"""SimCLR (Chen et al., 2020): NT-Xent over all views of the batch; every other view is a negative."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from swav_fast.distributed import gather_samples, rank
from swav_fast.losses.contrastive import nt_xent_loss
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import SimCLRConfig, method_config
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
        z = per_view(self.model(views), len(views))  # [V, B, D]
        batch = z.shape[1]
        # every rank's samples are negatives (one process: the batch itself); this rank's are anchors
        anchors = slice(rank() * batch, (rank() + 1) * batch)
        return nt_xent_loss(gather_samples(z, with_grad=True), self.temperature, anchors)


@register_method("simclr", optim="exclude_bias_and_norm", heads=(2048, 128), config=SimCLRConfig,
                 paper="Chen et al. 2020, A Simple Framework for Contrastive Learning",
                 state="nothing besides the online network",
                 ddp="embeddings all-gathered (with gradients) for the negatives; nothing per rank")
def build_simclr(cfg: Any) -> SimCLR:
    mc = method_config(cfg, "simclr")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "simclr")
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers))
    return SimCLR(model, mc.temperature)
