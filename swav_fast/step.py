"""One training step behind one call, whatever the execution mode.

``TrainStep(views, lr, iteration, indices)`` runs a :class:`~swav_fast.methods.Method`'s forward and
loss, backward, its hooks, the freeze of its frozen parameters (SwAV's prototypes) and the optimiser
update, and returns the detached loss. Modes: ``eager`` (plain PyTorch) and ``compile``
(``torch.compile`` of the forward and loss); a CUDA-graph mode plugs in here too, with the same maths.

A step whose loss (or, without a grad scaler, a gradient) is NaN/inf changes nothing: parameters,
batch-norm statistics, the queue and the optimiser state are restored on the device by
:class:`~swav_fast.guards.NonFiniteGuard`, with no host synchronisation; ``step.guard.counts()``
tells how many steps were skipped.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Collection, Sequence

import torch
import torch.nn as nn

from swav_fast import faults
from swav_fast.errors import ConfigError
from swav_fast.guards import NonFiniteGuard, is_finite, state_tensors

log = logging.getLogger("swav_fast")
MODES = ("eager", "compile")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``: bf16 on GPU, none on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class TrainStep:
    """Forward + loss + backward + update of a :class:`~swav_fast.methods.Method`.

    Args:
        method: the objective with its online ``model`` (see :mod:`swav_fast.methods.base`).
        optimizer: over ``method.trainable()``'s parameters; its param groups' ``lr`` is set each call.
        device: where views are moved.
        precision: ``auto``/``fp32``/``bf16``/``fp16`` autocast.
        channels_last: convert views to channels-last memory format (GPU).
        mode: ``eager`` or ``compile``.
        debug_nan_steps: TESTING ONLY: iterations whose inputs are replaced by NaN.
    """

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "auto", channels_last: bool = False, mode: str = "eager",
                 debug_nan_steps: Collection[int] = ()):
        if mode not in MODES:
            raise ConfigError(f"unknown step mode {mode!r}; valid: {', '.join(MODES)}")
        self.method, self.optimizer = method, optimizer
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self.channels_last = channels_last
        self.mode = mode
        self.guard = NonFiniteGuard(device)
        self.debug_nan_steps = frozenset(debug_nan_steps)
        self._step = torch.zeros((), dtype=torch.int64, device=device)  # the iteration, for the hooks
        self._forward = self._forward_loss
        if mode == "compile":
            self._forward = torch.compile(self._forward_loss)
        log.info("training step mode: %s (autocast %s, channels_last %s)", mode, self.dtype, channels_last)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _prepare(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [v.to(self.device, non_blocking=True, memory_format=fmt) for v in views]

    def _forward_loss(self, views: list[torch.Tensor], indices: torch.Tensor | None) -> torch.Tensor:
        with self._autocast():
            loss = self.method(views, indices)
        return loss.float()

    def _state(self) -> list[torch.Tensor]:
        return state_tensors((self.method,), self.optimizer)

    def _drop_frozen_grads(self, iteration: int) -> None:
        """No update at all (as with no gradient) for parameters that are still frozen."""
        for params, until in self.method.frozen_parameters():
            if iteration < until:
                for p in params:
                    p.grad = None

    def __call__(self, views: Sequence[torch.Tensor], lr: float, iteration: int,
                 indices: torch.Tensor | None = None) -> torch.Tensor:
        views = faults.poison_views(self._prepare(views), iteration, self.debug_nan_steps)
        if indices is not None:
            indices = indices.to(self.device, non_blocking=True)
        self._step.fill_(iteration)
        self.guard.begin(self._state())
        loss = self._forward(views, indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._drop_frozen_grads(iteration)
        self.method.before_update(self._step)
        # With fp16 the scaler skips (and counts) overflowing gradients itself; the loss is unscaled.
        grads = [] if self.scaler.is_enabled() else [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = is_finite(loss, grads)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_update(self._step)
        self.guard.end(finite, self._state())
        return loss.detach()
