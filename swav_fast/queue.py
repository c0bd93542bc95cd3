"""FIFO feature queue (per rank) that enlarges the batch Sinkhorn sees when batches are small."""
from __future__ import annotations

import torch
import torch.nn as nn


class FeatureQueue(nn.Module):
    """``slots`` independent FIFO queues of ``length`` embeddings of size ``dim``.

    ``push`` inserts the newest embeddings at the front (oldest fall off the end); ``is_full`` is
    True once ``length`` embeddings have been pushed, and only then should the queue be used. The
    buffers are part of ``state_dict`` so checkpoints carry the queue.

    For a captured CUDA graph the decisions stay on the device: :meth:`full` is a 0-d bool tensor
    and :meth:`push_where` pushes only where a device flag is set (same result as ``push`` or nothing).
    """

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
