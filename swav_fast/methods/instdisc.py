"""Instance discrimination (Wu et al., 2018): a non-parametric softmax over a memory bank, by NCE."""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from swav_fast.distributed import all_gather_cat, all_reduce_mean
from swav_fast.errors import ConfigError, DataError
from swav_fast.losses.contrastive import bank_softmax_loss, estimate_log_z, nce_loss
from swav_fast.memory import MemoryBank
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import InstDiscConfig, estimated_num_samples, method_config, num_global_views
from swav_fast.models.predictor import EncoderNet, MLPHead

log = logging.getLogger("swav_fast")


def bank_cosines(z: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """``[V, B, k]`` cosines of the unit features ``z`` [V, B, D] to memory-bank entries: ``entries``
    [B, k, D] (each sample's own rows) or [n, D] (the whole bank, the same for every sample), in
    float32 whatever the autocast (cosines / 0.07 need it); no gradient flows into the bank."""
    entries = entries.detach().to(z.dtype)
    with torch.autocast(z.device.type, enabled=False):
        if entries.dim() == 2:
            return torch.einsum("vbd,nd->vbn", z, entries)
        return torch.einsum("vbd,bkd->vbk", z, entries)


class InstDisc(Method):
    r"""Every training image is its own class, represented by a memory-bank entry :math:`v_i`.

    Each view's unit feature :math:`f` is scored against its own entry and ``num_negatives`` entries
    drawn uniformly from the *other* samples (the paper draws from all n; with its 1.28M images the
    difference is nil, but on a small dataset a sample drawn as its own noise dominates the loss);
    the loss is :func:`~swav_fast.losses.contrastive.nce_loss`, averaged over the views
    (the paper has one view; multi-crop views all discriminate against the same bank). The normaliser
    :math:`Z` is estimated on the first batch and then fixed (buffer ``log_z``, NaN until then), or
    with ``z_momentum < 1`` kept as a moving average of per-batch estimates: on a small dataset the
    bank fills with real features within a few steps, a first-batch Z (from the random bank) is then
    far too small and the noise term drags every feature the same way. After the optimiser step the
    entries of this batch's samples move towards the mean of their global views' features
    (momentum 0.5); under ``torch.distributed`` every rank applies the rows of every rank, so the
    banks stay identical.

    With ``loss="softmax"`` the non-parametric softmax is computed exactly over every bank row
    (:func:`~swav_fast.losses.contrastive.bank_softmax_loss`, the paper's eq. 2): no noise draw and no
    normaliser estimate, at the cost of scoring the whole bank (cheap for a small training set);
    ``log_z`` then holds the exact :math:`\log Z` of the last batch (mean over its views and samples),
    and ``num_negatives`` / ``z_momentum`` are unused (a warning says so when they are set).
    """

    name = "instdisc"

    def __init__(self, model: EncoderNet, memory_size: int, embed_dim: int, num_globals: int = 1,
                 temperature: float = 0.07, num_negatives: int = 4096, memory_momentum: float = 0.5,
                 auto_size: bool = True, z_momentum: float = 1.0, loss: str = "nce"):
        super().__init__()
        if memory_size < 2:
            memory_size = 2  # placeholder until on_train_start sizes it
        self.model = model
        self.memory = MemoryBank(memory_size, embed_dim, memory_momentum)
        self.num_globals = num_globals
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.auto_size = auto_size
        self.z_momentum = z_momentum
        self.loss = loss
        self.register_buffer("log_z", torch.tensor(float("nan")))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        if indices is None:
            raise DataError("instdisc needs the dataset index of every sample (the loader's batch.indices)")
        num_views, num_globals = len(views), min(self.num_globals, len(views))
        z = F.normalize(self.model(views).float(), dim=1)
        z = per_view(z, num_views)
        indices = indices.to(z.device)
        self._pending = (indices, F.normalize(z[:num_globals].mean(dim=0), dim=1).detach())
        if self.loss == "softmax":  # every row of the bank: [V, B, n]
            scores = bank_cosines(z, self.memory.bank)
            loss, log_z = bank_softmax_loss(scores, indices, self.temperature, return_log_z=True)
            # the exact normaliser of this pass, logged as the NCE estimate is (mean over ranks)
            self.log_z.copy_(all_reduce_mean(log_z.mean()))
            return loss
        # its own row and num_negatives noise rows per sample: [V, B, 1 + m]
        rows = torch.cat([indices[:, None], self.memory.sample_excluding(indices, self.num_negatives)], dim=1)
        scores = bank_cosines(z, self.memory.get(rows))
        with torch.no_grad():
            # the mean over ranks: every rank keeps the same normaliser
            estimate = all_reduce_mean(estimate_log_z(scores, self.temperature, self.memory.size))
            self.log_z.copy_(torch.where(torch.isnan(self.log_z), estimate, self._z_average(estimate)))
        noise_rows = self.memory.size - 1  # P_n = 1 / (n - 1): a sample's own row is never noise
        loss = sum(nce_loss(scores[v], self.temperature, self.log_z, noise_rows) for v in range(num_views))
        return loss / num_views

    def _z_average(self, estimate: torch.Tensor) -> torch.Tensor:
        r""":math:`\log(m Z + (1 - m)\hat Z)`; m = 1 keeps the first estimate (the paper)."""
        m = self.z_momentum
        if m >= 1.0:
            return self.log_z
        if m <= 0.0:
            return estimate
        return torch.logaddexp(self.log_z + math.log(m), estimate + math.log(1.0 - m))

    def after_update(self, step: torch.Tensor) -> None:
        if self._pending is not None:  # every rank applies every rank's rows: the banks stay equal
            self.memory.update_(*(all_gather_cat(t) for t in self._pending))
            self._pending = None

    def on_train_start(self, num_samples: int, total_steps: int) -> None:
        """Size the bank to the training set (when ``methods.instdisc.memory_size`` is 0)."""
        if self.auto_size:
            self.memory.resize_(num_samples)
        elif num_samples > self.memory.size:
            raise ConfigError(f"methods.instdisc.memory_size={self.memory.size} is smaller than the training "
                              f"set ({num_samples} images); set it to 0 (automatic) or >= {num_samples}")


@register_method("instdisc", min_views=1,  # one view is compared with the memory bank
                 optim="all", heads=(2048, 128), config=InstDiscConfig,
                 paper="Wu et al. 2018, Unsupervised Feature Learning via Non-Parametric Instance "
                       "Discrimination",
                 state="the memory bank (one unit vector per training sample) and the NCE normaliser Z",
                 ddp="embeddings and indices all-gathered to update the bank, which every rank holds whole")
def build_instdisc(cfg: Any) -> InstDisc:
    mc = method_config(cfg, "instdisc")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "instdisc")
    size = mc.memory_size or estimated_num_samples(cfg) or 1  # resized by on_train_start when unknown
    if mc.loss == "softmax":
        unused = [f"{k}={getattr(mc, k)}" for k in ("num_negatives", "z_momentum")
                  if getattr(mc, k) != getattr(InstDiscConfig, k)]
        if unused:
            log.warning("methods.instdisc: %s unused with loss=softmax (it scores every row of the bank; "
                        "they apply to loss=nce)", ", ".join(unused))
    model = EncoderNet(m.arch, lambda d: MLPHead(d, hidden, feat, mc.projector_layers))
    return InstDisc(model, size, feat, num_global_views(cfg), mc.temperature, mc.num_negatives,
                    mc.memory_momentum, auto_size=mc.memory_size == 0,
                    z_momentum=mc.z_momentum, loss=mc.loss)
