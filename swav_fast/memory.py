"""Stored embeddings outside the batch: InstDisc's memory bank and MoCo's FIFO key queue.

Both are ``nn.Module`` buffers (so checkpoints carry them) and update with tensor ops only: no host
synchronisation, replayable in a CUDA graph. Updated rows are unit-norm.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from swav_fast.errors import ConfigError


def _random_unit(rows: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim), dim=1)


def lemniscate_init(rows: int, dim: int) -> torch.Tensor:
    r"""InstDisc's memory-bank start as the official lemniscate code makes it: entries uniform in
    :math:`[-s, s]`, :math:`s = 1/\sqrt{\text{dim}/3}`, not normalised (each row's squared norm is
    :math:`\text{dim}\cdot s^2/3 = 1` in expectation)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(rows, dim).mul_(2 * stdv).add_(-stdv)


class MemoryBank(nn.Module):
    r"""One unit vector :math:`v_i` per training sample (InstDisc).

    :meth:`update_` mixes in new features by index,
    :math:`v_i \leftarrow \operatorname{normalize}(m\,v_i + (1 - m) f_i)` (the paper uses m = 0.5);
    :meth:`sample` draws noise indices uniformly (with replacement), :meth:`sample_excluding` the same
    but never a sample's own row. Starts as lemniscate's does (:func:`lemniscate_init`: uniform entries,
    rows of unit norm in expectation); updated rows are unit vectors.
    """

    def __init__(self, size: int, dim: int, momentum: float = 0.5):
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError(f"memory bank needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"memory bank momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("bank", lemniscate_init(size, dim))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def resize_(self, size: int) -> None:
        """Re-create the bank with ``size`` random rows (when the dataset size becomes known)."""
        if size < 1:
            raise ConfigError(f"memory bank size must be >= 1, got {size}")
        if size != self.size:
            self.bank = lemniscate_init(size, self.bank.shape[1]).to(self.bank.device, self.bank.dtype)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (any shape ``S``), ``[*S, dim]``."""
        return self.bank[indices]

    def sample(self, *shape: int) -> torch.Tensor:
        """Uniform noise indices of the given shape (int64, on the bank's device)."""
        return torch.randint(0, self.size, shape, device=self.bank.device)

    def sample_excluding(self, indices: torch.Tensor, num: int) -> torch.Tensor:
        """``[B, num]`` indices drawn uniformly from the other ``size - 1`` rows than ``indices[b]``
        (draw from ``size - 1`` values, shift those at or above the excluded one up by one)."""
        if self.size < 2:
            raise ConfigError("a memory bank needs at least 2 rows to draw negatives from")
        noise = torch.randint(0, self.size - 1, (indices.shape[0], num), device=self.bank.device)
        return noise + (noise >= indices.to(self.bank.device)[:, None]).long()

    @torch.no_grad()
    def update_(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Momentum update of rows ``indices`` (``[B]``) with ``features`` (``[B, dim]``)."""
        indices = indices.to(self.bank.device)
        new = features.detach().to(self.bank.dtype)
        mixed = self.bank[indices] * self.momentum + new * (1.0 - self.momentum)
        self.bank.index_copy_(0, indices, F.normalize(mixed, dim=1))


class KeyQueue(nn.Module):
    """A ring buffer of the ``length`` most recent keys (MoCo's dictionary of negatives).

    Starts as random unit vectors and is used from the first step, as in MoCo. ``push`` writes the
    newest keys at the pointer (wrapping around), so its cost does not grow with ``length``; the
    pointer is a device tensor.
    """

    def __init__(self, length: int, dim: int):
        super().__init__()
        if length < 1 or dim < 1:
            raise ConfigError(f"key queue needs length >= 1 and dim >= 1, got length={length}, dim={dim}")
        self.register_buffer("keys", _random_unit(length, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def length(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Insert ``keys`` (``[N, dim]``, N <= length), overwriting the oldest entries."""
        n = keys.shape[0]
        if n > self.length:
            raise ConfigError(f"cannot push {n} keys into a queue of length {self.length}; make it longer")
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % self.length
        self.keys.index_copy_(0, slots, keys.detach().to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.length)
