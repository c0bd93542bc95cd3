"""The SwAV objective: codes by Sinkhorn on the assigned crops, swapped prediction by all crops."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from swav_fast.losses import sinkhorn_knopp, swapped_prediction_loss
from swav_fast.queue import FeatureQueue


class SwAVObjective(nn.Module):
    """Turns ``(z, scores)`` of all views into the SwAV loss; owns the optional feature queue.

    Args:
        num_views: views per sample (e.g. 2 + 6).
        crops_for_assign: views whose codes are predicted (default the two global crops).
        temperature, epsilon, sinkhorn_iterations: as in the paper (0.1, 0.05, 3).
        queue_length: per-rank queue length (0 = no queue); must be a multiple of the local batch.
        embed_dim: embedding size (for the queue).
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
        self.queue_active = False  # set by the trainer from epoch_queue_starts on

    def codes(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes ``[A, B, K]`` of the assigned views (queue rows prepended when full)."""
        out = []
        use_queue = self.queue is not None and self.queue_active and self.queue.is_full()
        for j, view in enumerate(self.crops_for_assign):
            s = scores[view].detach()
            if use_queue:
                queue_scores = self.queue.items[j] @ prototypes.detach().t()
                s = torch.cat([queue_scores.to(s.dtype), s])
            q = sinkhorn_knopp(s, self.epsilon, self.sinkhorn_iterations)
            out.append(q[-scores.shape[1]:])
        return torch.stack(out)

    def forward(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Loss from embeddings ``z`` ``[V*B, D]`` and scores ``[V*B, K]`` (view-major order)."""
        scores = scores.view(self.num_views, -1, scores.shape[-1])
        z = z.view(self.num_views, -1, z.shape[-1])
        q = self.codes(z, scores, prototypes)
        if self.queue is not None and self.queue_active:
            self.queue.push(z[self.crops_for_assign])
        return swapped_prediction_loss(scores, q, self.crops_for_assign, self.temperature)
