"""The SwAV objective: codes by Sinkhorn on the assigned crops, swapped prediction by all crops."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from swav_fast.errors import ConfigError
from swav_fast.losses import sinkhorn_knopp, swapped_prediction_loss
from swav_fast.losses.fused import fused_swav_loss
from swav_fast.methods.base import HealthReport, Method, head_sizes, register_method
from swav_fast.methods.configs import SwAVConfig, method_config
from swav_fast.models import SwAVModel
from swav_fast.models.heads import prototype_scores


class FeatureQueue(nn.Module):
    """``slots`` independent FIFO queues of ``length`` embeddings of size ``dim``.

    ``push`` inserts the newest embeddings at the front (oldest fall off the end); ``is_full`` is
    True once ``length`` embeddings have been pushed, and only then should the queue be used. The
    buffers are part of ``state_dict`` so checkpoints carry the queue.

    For a captured CUDA graph the decisions stay on the device: :meth:`full` is a 0-d bool tensor
    and :meth:`push_where` pushes only where a device flag is set (same result as ``push`` or nothing).
    """

    #: each rank keeps its own queue: DDP neither broadcasts nor averages these buffers (see ddp.py)
    per_rank_state = True

    def __init__(self, slots: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("items", torch.zeros(slots, length, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._known_full = False  # the host has seen count >= length (it never decreases but by reset/load)

    @property
    def length(self) -> int:
        return self.items.shape[1]

    def is_full(self) -> bool:
        """Host-side test. Reads the device counter (a synchronisation) only until the queue is seen
        full: pushes only add, and a skipped (non-finite) step restores a count that was already full."""
        if not self._known_full:
            self._known_full = int(self.count) >= self.length
        return self._known_full

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._known_full = False  # a loaded queue may be shorter
        super()._load_from_state_dict(*args, **kwargs)

    def full(self) -> torch.Tensor:
        """0-d bool tensor on the queue's device: ``length`` embeddings have been pushed."""
        return self.count >= self.length

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """``embeddings``: ``[slots, B, dim]``, newest first after the call."""
        b = embeddings.shape[1]
        self.items[:, b:] = self.items[:, :-b].clone()
        self.items[:, :b] = embeddings.detach().to(self.items.dtype)
        self.count += b

    @torch.no_grad()
    def push_where(self, embeddings: torch.Tensor, enabled: torch.Tensor) -> None:
        """:meth:`push` where the 0-d bool tensor ``enabled`` is True, else leave the queue unchanged
        (no host synchronisation; the same kernels run either way)."""
        b = embeddings.shape[1]
        pushed = torch.cat([embeddings.detach().to(self.items.dtype), self.items], dim=1)[:, :self.length]
        self.items.copy_(torch.where(enabled, pushed, self.items))
        self.count.add_(enabled.to(self.count.dtype) * b)

    def reset(self) -> None:
        self.items.zero_()
        self.count.zero_()
        self._known_full = False



COLLAPSE_REMEDIES = (
    "start the queue later or make it shorter (methods.swav.epoch_queue_starts, methods.swav.queue_length)",
    "use a smaller methods.swav.epsilon (e.g. 0.03)",
    "freeze the prototypes for longer (methods.swav.freeze_prototypes_niters)",
)


@dataclass
class CollapseSigns:
    """Collapse indicators of one batch (the assigned views' prototype scores)."""
    loss: float
    ln_k: float  # the loss of uniform predictions over K prototypes
    prototypes_used: int  # distinct argmax prototypes over the batch (the most of any view)
    samples: int  # batch size
    prediction_entropy: float  # mean entropy of softmax(scores / T), as a fraction of ln K
    signs: list[str] = field(default_factory=list)

    @property
    def collapsed(self) -> bool:
        return bool(self.signs)

    def message(self) -> str:
        return (f"SwAV collapse signs: {'; '.join(self.signs)}. Usual remedies: "
                f"{'; '.join(COLLAPSE_REMEDIES)}")


@torch.no_grad()
def collapse_signs(loss: float, scores: torch.Tensor, temperature: float,
                   uniform_fraction: float = 0.99) -> CollapseSigns:
    r"""SwAV's known failures, from ``scores`` ``[..., B, K]`` of the assigned views (a host sync):
    every sample of a view on one prototype (``argmax`` takes one value over the batch), or uniform
    predictions, :math:`\bar H(\mathrm{softmax}(s / T)) \ge 0.99 \ln K` (the loss then sits at ln K)."""
    k = scores.shape[-1]
    views = scores.detach().float().reshape(-1, scores.shape[-2], k)  # [A, B, K]
    log_p = torch.log_softmax(views / temperature, dim=-1)
    entropy = float(-(log_p.exp() * log_p).sum(-1).mean()) / math.log(k) if k > 1 else 0.0
    used = max(int(v.argmax(-1).unique().numel()) for v in views)  # per view: the batch's assignments
    batch = views.shape[1]
    out = CollapseSigns(loss, math.log(k), used, batch, entropy)
    if used == 1 and batch > 1 and k > 1:
        out.signs.append(f"all {batch} samples of a view are assigned to one of {k} prototypes")
    if entropy >= uniform_fraction:
        out.signs.append(f"predictions are uniform over the prototypes (loss {loss:.4f}, ln K = "
                         f"{out.ln_k:.4f})")
    return out


class SwAVObjective(nn.Module):
    """Turns ``(z, scores)`` of all views into the SwAV loss; owns the optional feature queue.

    Args:
        num_views: views per sample (e.g. 2 + 6).
        crops_for_assign: views whose codes are predicted (default the two global crops).
        temperature, epsilon, sinkhorn_iterations: as in the paper (0.1, 0.05, 3).
        queue_length: per-rank queue length (0 = no queue); must be a multiple of the local batch.
        embed_dim: embedding size (for the queue).

    Two implementations of the same maths: the eager functions with host-side queue decisions
    (default), and with ``fused = True`` (the ``compile`` and ``graph`` step modes)
    :func:`~swav_fast.losses.fused.fused_swav_loss` with the decisions on the device: the queue takes
    part in Sinkhorn as masked rows under the 0-d flag ``queue_on & queue.full()`` and is pushed with
    :meth:`FeatureQueue.push_where`, so no host synchronisation and no re-capture.
    ``queue_active`` sets the device flag ``queue_on`` (not saved: the trainer sets it from the epoch)
    and a host copy of it, which the eager path reads (reading the device flag would synchronise).
    """

    def __init__(self, num_views: int, crops_for_assign: Sequence[int] = (0, 1), temperature: float = 0.1,
                 epsilon: float = 0.05, sinkhorn_iterations: int = 3, queue_length: int = 0,
                 embed_dim: int = 128):
        super().__init__()
        self.num_views = num_views
        self.crops_for_assign = list(crops_for_assign)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue = FeatureQueue(len(self.crops_for_assign), queue_length, embed_dim) if queue_length else None
        self.register_buffer("queue_on", torch.zeros((), dtype=torch.bool), persistent=False)
        self._queue_on_host = False  # what was last written to queue_on
        self.fused = False  # set by the training step (compile / graph modes)

    @property
    def queue_active(self) -> bool:
        """The queue is in use this epoch (set by the trainer from ``epoch_queue_starts`` on)."""
        return self._queue_on_host

    @queue_active.setter
    def queue_active(self, value: bool) -> None:
        self._queue_on_host = bool(value)
        self.queue_on.fill_(bool(value))

    def codes(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes ``[A, B, K]`` of the assigned views (queue rows prepended when full)."""
        out = []
        use_queue = self.queue is not None and self.queue_active and self.queue.is_full()
        for j, view in enumerate(self.crops_for_assign):
            s = scores[view].detach()
            if use_queue:
                queue_scores = prototype_scores(self.queue.items[j], prototypes.detach())
                s = torch.cat([queue_scores.to(s.dtype), s])
            q = sinkhorn_knopp(s, self.epsilon, self.sinkhorn_iterations)
            out.append(q[-scores.shape[1]:])
        return torch.stack(out)

    def forward(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Loss from embeddings ``z`` ``[V*B, D]`` and scores ``[V*B, K]`` (view-major order)."""
        scores = scores.view(self.num_views, -1, scores.shape[-1])
        z = z.view(self.num_views, -1, z.shape[-1])
        if self.fused:
            return self._fused_forward(z, scores, prototypes)
        q = self.codes(z, scores, prototypes)
        if self.queue is not None and self.queue_active:
            self.queue.push(z[self.crops_for_assign])
        return swapped_prediction_loss(scores, q, self.crops_for_assign, self.temperature)

    def _fused_forward(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with device-side queue decisions (``z`` ``[V, B, D]``, scores ``[V, B, K]``)."""
        queue_scores = use_queue = None
        if self.queue is not None:
            queue_scores = prototype_scores(self.queue.items.flatten(0, 1), prototypes.detach()).view(
                *self.queue.items.shape[:2], -1)  # [A, L, K], float32
            use_queue = self.queue_on & self.queue.full()
        loss = fused_swav_loss(scores, self.crops_for_assign, self.temperature, self.epsilon,
                               self.sinkhorn_iterations, queue_scores, use_queue)
        if self.queue is not None:
            self.queue.push_where(torch.stack([z[i] for i in self.crops_for_assign]), self.queue_on)
        return loss


class SwAVMethod(Method):
    """SwAV as a :class:`~swav_fast.methods.base.Method`: :class:`SwAVModel` + :class:`SwAVObjective`.

    The prototypes get no update for the first ``freeze_prototypes_niters`` iterations
    (:meth:`frozen_parameters`) and are re-normalised to unit rows after every update; the feature
    queue is used from epoch ``epoch_queue_starts`` on.
    """

    name = "swav"

    def __init__(self, model: SwAVModel, objective: SwAVObjective, freeze_prototypes_niters: int = 0,
                 epoch_queue_starts: int = 0):
        super().__init__()
        self.epoch_queue_starts = int(epoch_queue_starts)
        self.model = model
        self.objective = objective
        self.freeze_prototypes_niters = int(freeze_prototypes_niters)
        self.last_scores: torch.Tensor | None = None  # detached scores of the last step (collapse checks)

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        z, scores = self.model(views)
        self.last_scores = scores.detach()
        return self.objective(z.float(), scores.float(), self.model.prototypes.weight)

    def frozen_parameters(self) -> list[tuple[list[nn.Parameter], int]]:
        return [(list(self.model.prototypes.parameters()), self.freeze_prototypes_niters)]

    @torch.no_grad()
    def after_update(self, step: torch.Tensor) -> None:
        """Re-normalise the prototypes once they train (a tensor test: replayable in a CUDA graph)."""
        w = self.model.prototypes.weight
        w.copy_(torch.where(step >= self.freeze_prototypes_niters, F.normalize(w, dim=1, p=2), w))

    def set_fused(self, enabled: bool) -> None:
        """Use the fused, device-flagged loss (:mod:`swav_fast.losses.fused`): the step's ``compile``
        and ``graph`` modes turn it on; the eager functions stay the reference."""
        self.objective.fused = bool(enabled)

    def on_epoch_start(self, epoch: int) -> None:
        """The queue is used from epoch ``epoch_queue_starts`` on (once full); a device flag, so a
        captured step sees it without re-capture."""
        self.objective.queue_active = self.objective.queue is not None and epoch >= self.epoch_queue_starts

    def health(self, step: int, loss: float) -> HealthReport | None:
        """Collapse of the codes (:func:`collapse_signs` on the last step's assigned scores), checked once
        the prototypes train (after ``freeze_prototypes_niters``); ``None`` before, or with no scores or
        a non-finite loss (the non-finite guard reports those)."""
        scores = self.assigned_scores()
        if scores is None or step <= self.freeze_prototypes_niters or not math.isfinite(loss):
            return None
        signs = collapse_signs(loss, scores, self.objective.temperature)
        signals = {"loss": loss, "ln_k": signs.ln_k, "prototypes_used": signs.prototypes_used,
                   "samples": signs.samples, "prediction_entropy": round(signs.prediction_entropy, 4),
                   "signs": signs.signs, "remedies": list(COLLAPSE_REMEDIES)}
        message = signs.message() if signs.collapsed else ""
        return HealthReport(not signs.collapsed, signals, message, kind="collapse")

    def assigned_scores(self) -> torch.Tensor | None:
        """Scores ``[A, B, K]`` of the code-assigned views of the last step."""
        if self.last_scores is None:
            return None
        o = self.objective
        return self.last_scores.view(o.num_views, -1, self.last_scores.shape[-1])[o.crops_for_assign]


def check_swav(cfg: Any) -> None:
    """``methods.swav.crops_for_assign`` must name existing views."""
    num_views = sum(cfg.data.crops.num_crops)
    assign = list(method_config(cfg, "swav").crops_for_assign)
    if not assign or any(not 0 <= i < num_views for i in assign):
        raise ConfigError(f"methods.swav.crops_for_assign={assign} must be non-empty view indices in "
                          f"[0, {num_views - 1}] (there are {num_views} crops)")


@register_method("swav", check=check_swav, optim="all", heads=(2048, 128), config=SwAVConfig,
                 paper="Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster "
                       "Assignments",
                 state="the prototypes (in the online network) and the feature queue",
                 ddp="Sinkhorn's sums all-reduced over ranks; the feature queue per rank (gathered into "
                     "checkpoints as objective_ranks, reset on another world size)")
def build_swav(cfg: Any) -> SwAVMethod:
    """SwAV from a :class:`swav_fast.config.Config` (``model`` and ``methods.swav`` sections)."""
    from swav_fast.distributed import world_size

    m, s = cfg.model, method_config(cfg, "swav")
    hidden, feat = head_sizes(cfg, "swav")
    model = SwAVModel(m.arch, hidden, feat, m.num_prototypes)
    objective = SwAVObjective(sum(cfg.data.crops.num_crops), s.crops_for_assign, s.temperature, s.epsilon,
                              s.sinkhorn_iterations, s.queue_length // world_size(), feat)
    return SwAVMethod(model, objective, s.freeze_prototypes_niters, s.epoch_queue_starts)
