"""One training step behind one call, whatever the execution mode.

``TrainStep(views, lr, iteration)`` runs forward (trunk once per resolution), the objective's loss,
backward, the prototype freeze, the optimiser update and prototype re-normalisation, and returns
the detached loss. Modes: ``eager`` (plain PyTorch) and ``compile`` (``torch.compile`` of the model
and loss); a CUDA-graph mode plugs in here too, with the same maths.

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
    """Forward + loss + backward + update for a model with ``prototypes`` (SwAV) or without.

    Args:
        model: returns ``(z, scores)`` for a list of views.
        objective: maps ``(z, scores, prototype_weights)`` to a scalar loss.
        optimizer: its param groups' ``lr`` is set each call.
        device: where views are moved.
        precision: ``auto``/``fp32``/``bf16``/``fp16`` autocast.
        channels_last: convert views to channels-last memory format (GPU).
        freeze_prototypes_niters: prototypes get no update for iterations below this.
        mode: ``eager`` or ``compile``.
        debug_nan_steps: TESTING ONLY: iterations whose inputs are replaced by NaN.
    """

    def __init__(self, model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str = "auto", channels_last: bool = False,
                 freeze_prototypes_niters: int = 0, mode: str = "eager",
                 debug_nan_steps: Collection[int] = ()):
        if mode not in MODES:
            raise ConfigError(f"unknown step mode {mode!r}; valid: {', '.join(MODES)}")
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self.channels_last = channels_last
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.mode = mode
        self.guard = NonFiniteGuard(device)
        self.debug_nan_steps = frozenset(debug_nan_steps)
        self.last_scores: torch.Tensor | None = None  # detached prototype scores of the last step
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

    def _forward_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            z, scores = self.model(views)
        prototypes = getattr(self.model, "prototypes", None)
        loss = self.objective(z.float(), scores.float(), prototypes.weight if prototypes is not None else None)
        return loss, scores

    def _state(self) -> list[torch.Tensor]:
        return state_tensors((self.model, self.objective), self.optimizer)

    def __call__(self, views: Sequence[torch.Tensor], lr: float, iteration: int) -> torch.Tensor:
        views = faults.poison_views(self._prepare(views), iteration, self.debug_nan_steps)
        self.guard.begin(self._state())
        loss, scores = self._forward(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        prototypes = getattr(self.model, "prototypes", None)
        frozen = prototypes is not None and iteration < self.freeze_prototypes_niters
        if frozen:
            for p in prototypes.parameters():
                p.grad = None
        # With fp16 the scaler skips (and counts) overflowing gradients itself; the loss is unscaled.
        grads = [] if self.scaler.is_enabled() else [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = is_finite(loss, grads)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if prototypes is not None and not frozen:
            prototypes.normalize_()
        self.guard.end(finite, self._state())
        self.last_scores = scores.detach()
        return loss.detach()
