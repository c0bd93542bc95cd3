"""MoCo v2 (Chen et al., 2020) and MoCo v3 (Chen, Xie & He, 2021): a momentum key encoder and InfoNCE.

v2: queries from the online encoder, keys from its EMA copy (0.999), negatives from a queue of
65,536 past keys, T 0.2; the key encoder's batch norm sees shuffled sub-batches (shuffle BN).
v3: a predictor on the online branch, momentum 0.99 -> 1 (cosine), symmetric loss, the batch's
other keys as negatives (no queue).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from swav_fast.distributed import all_gather_cat, gather_samples, rank
from swav_fast.errors import ConfigError
from swav_fast.losses.contrastive import info_nce_loss, view_pairs
from swav_fast.memory import KeyQueue
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import (MoCoV2Config, MoCoV3Config, estimated_total_steps, method_config,
                                       num_global_views)
from swav_fast.methods.momentum import EMATarget
from swav_fast.models.predictor import EncoderNet, MLPHead


def moco_v2_key_views(num_views: int, num_globals: int, symmetric: bool) -> list[int]:
    """Views the key encoder sees: all globals when ``symmetric``, else view 1 (view 0 with one
    global), as in the paper, whose queries come from view 0."""
    num_globals = min(num_globals, num_views)
    if symmetric:
        return list(range(num_globals))
    return [min(1, num_globals - 1)]


class MoCoV2(Method):
    r"""Query encoder ``model`` (trunk + MLP), key encoder by EMA, queue of negatives.

    With key views K (:func:`moco_v2_key_views`) and pairs :math:`(g, v), g \in K, v \neq g`:

    .. math:: \mathcal{L} = \frac{1}{P}\sum_{(g, v)} \mathrm{InfoNCE}(q_v, k_g, \text{queue}, \tau)

    After the optimiser step the key encoder moves by EMA and this step's keys enter the queue.

    Args:
        shuffle_bn_batch: the key encoder runs on sub-batches of about this size of a random
            permutation of the batch (``batch // shuffle_bn_batch`` of them): its batch-norm statistics
            then differ from the queries', so the model cannot use them to find the positive (the
            paper's shuffle BN across 8 GPUs of 32, on one device). A batch smaller than twice this
            is not split.
    """

    name = "moco_v2"

    def __init__(self, model: EncoderNet, embed_dim: int, num_globals: int = 2, temperature: float = 0.2,
                 queue_length: int = 65536, momentum: float = 0.999, symmetric: bool = False,
                 shuffle_bn_batch: int = 32):
        super().__init__()
        self.model = model
        self.target = EMATarget(model, momentum, momentum)
        self.queue = KeyQueue(queue_length, embed_dim)
        self.num_globals = num_globals
        self.temperature = temperature
        self.symmetric = symmetric
        self.shuffle_bn_batch = shuffle_bn_batch
        self._pending_keys: torch.Tensor | None = None

    @torch.no_grad()
    def keys(self, view: torch.Tensor) -> torch.Tensor:
        """Unit-norm keys ``[B, D]`` of one view, batch norm over shuffled sub-batches."""
        batch = view.shape[0]
        groups = max(1, batch // self.shuffle_bn_batch)
        if groups == 1:
            return F.normalize(self.target([view]).float(), dim=1)
        perm = torch.argsort(torch.rand(batch, device=view.device))
        chunks = view[perm].tensor_split(groups)
        k = torch.cat([self.target([c]) for c in chunks]).float()
        return F.normalize(k[torch.argsort(perm)], dim=1)

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        num_views = len(views)
        q = self.model(views)
        q = per_view(q, num_views)
        key_views = moco_v2_key_views(num_views, self.num_globals, self.symmetric)
        keys = {g: self.keys(views[g]) for g in key_views}
        negatives = self.queue.keys
        pairs = view_pairs(num_views, key_views)
        loss = sum(info_nce_loss(q[v], keys[g], negatives, self.temperature) for g, v in pairs) / len(pairs)
        self._pending_keys = torch.cat([keys[g] for g in key_views])
        return loss

    def convert_sync_batchnorm_(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        """The query encoder only: the key encoder keeps per-rank (shuffle) batch norm, whose point is
        statistics that differ from the queries'."""
        self.model = convert(self.model)

    def after_update(self, step: torch.Tensor) -> None:
        self.target.update_(self.model, step)
        if self._pending_keys is not None:
            self.queue.push(all_gather_cat(self._pending_keys))  # all ranks' keys, as the paper
            self._pending_keys = None


class MoCoV3(Method):
    r"""Online trunk + projector + predictor; momentum encoder (trunk + projector) by EMA,
    0.99 -> 1 on a cosine. Keys of the G global views, queries from all V views, pairs
    :math:`(g, v), v \neq g`; the other keys of the batch are the negatives:

    .. math:: \mathcal{L} = \frac{2}{P}\sum_{(g, v)} 2\tau\,\mathrm{InfoNCE}(q_v, k_g, \tau)

    For two views this is the paper's :math:`\mathrm{ctr}(q_1, k_2) + \mathrm{ctr}(q_2, k_1)` with
    its :math:`2\tau` factor.
    """

    name = "moco_v3"

    def __init__(self, model: EncoderNet, num_globals: int = 2, temperature: float = 1.0,
                 base_momentum: float = 0.99, final_momentum: float = 1.0, total_steps: int = 0):
        super().__init__()
        model.require_predictor("MoCo v3")
        self.model = model
        self.target = EMATarget(model, base_momentum, final_momentum, total_steps, drop=("predictor",))
        self.num_globals = num_globals
        self.temperature = temperature

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        num_views, num_globals = len(views), min(self.num_globals, len(views))
        z = self.model(views)
        q = self.model.predictor(z)
        q = per_view(q, num_views)
        k = per_view(self.target(views[:num_globals]), num_globals)  # [G, B, D], no gradient
        batch = k.shape[1]
        # negatives: every rank's keys (the paper gathers them); query b's positive is this rank's key b
        k = gather_samples(k, with_grad=False)
        pairs = view_pairs(num_views, range(num_globals))
        total = sum(info_nce_loss(q[v], k[g], None, self.temperature, key_offset=rank() * batch)
                    for g, v in pairs)
        return total * (2.0 / len(pairs)) * (2.0 * self.temperature)

    def after_update(self, step: torch.Tensor) -> None:
        self.target.update_(self.model, step)

    def on_train_start(self, num_samples: int, total_steps: int) -> None:
        self.target.schedule.set_total_steps(total_steps)


@register_method("moco_v2", optim="all", heads=(2048, 128), config=MoCoV2Config,
                 paper="Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning",
                 state="the EMA key encoder and the key queue",
                 ddp="keys all-gathered into the queue (the same on every rank); the key encoder's "
                     "shuffle BN statistics per rank")
def build_moco_v2(cfg: Any) -> MoCoV2:
    mc = method_config(cfg, "moco_v2")
    num_views = sum(cfg.data.crops.num_crops)
    m = cfg.model
    key_views = moco_v2_key_views(num_views, num_global_views(cfg), mc.symmetric)
    per_step = cfg.optim.batch_size * len(key_views)
    if mc.queue_length < per_step:
        raise ConfigError(f"methods.moco_v2.queue_length={mc.queue_length} is shorter than the {per_step} "
                          f"keys one step pushes (optim.batch_size {cfg.optim.batch_size} x {len(key_views)} "
                          f"key views)")
    hidden, feat = head_sizes(cfg, "moco_v2")
    # the paper's MLP head has no batch norm (2048-ReLU-128)
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers, batch_norm=False))
    return MoCoV2(model, feat, num_global_views(cfg), mc.temperature, mc.queue_length, mc.momentum,
                  mc.symmetric, mc.shuffle_bn_batch)


@register_method("moco_v3", optim="exclude_bias_and_norm", heads=(4096, 256), config=MoCoV3Config,
                 paper="Chen, Xie & He 2021, An Empirical Study of Training Self-Supervised Vision "
                       "Transformers",
                 state="the EMA key encoder and its momentum schedule",
                 ddp="keys all-gathered for the in-batch negatives; nothing per rank")
def build_moco_v3(cfg: Any) -> MoCoV3:
    mc = method_config(cfg, "moco_v3")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "moco_v3")
    # official ResNet recipe: Linear-BN-ReLU blocks, projector ends in an affine-free BN, predictor does not
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers,
                                                 last_batch_norm=True, last_affine=False),
                       predictor=MLPHead(feat, mc.predictor_hidden_dim, feat, 2, last_bias=False))
    return MoCoV3(model, num_global_views(cfg), mc.temperature, mc.base_momentum, mc.final_momentum,
                  estimated_total_steps(cfg))
