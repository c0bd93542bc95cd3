"""One training step behind one call, whatever the execution mode.

``TrainStep(views, lr, iteration)`` runs forward (trunk once per resolution), the objective's loss,
backward, the prototype freeze, the optimiser update and prototype re-normalisation, and returns
the detached loss. Modes: ``eager`` (plain PyTorch) and ``compile`` (``torch.compile`` of the model
and loss); a CUDA-graph mode plugs in here too, with the same maths.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch
import torch.nn as nn

from swav_fast.errors import ConfigError

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
    """

    def __init__(self, model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str = "auto", channels_last: bool = False,
                 freeze_prototypes_niters: int = 0, mode: str = "eager"):
        if mode not in MODES:
            raise ConfigError(f"unknown step mode {mode!r}; valid: {', '.join(MODES)}")
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self.channels_last = channels_last
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.mode = mode
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

    def _forward_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            z, scores = self.model(views)
        prototypes = getattr(self.model, "prototypes", None)
        return self.objective(z.float(), scores.float(), prototypes.weight if prototypes is not None else None)

    def __call__(self, views: Sequence[torch.Tensor], lr: float, iteration: int) -> torch.Tensor:
        views = self._prepare(views)
        loss = self._forward(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        prototypes = getattr(self.model, "prototypes", None)
        frozen = prototypes is not None and iteration < self.freeze_prototypes_niters
        if frozen:
            for p in prototypes.parameters():
                p.grad = None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if prototypes is not None and not frozen:
            prototypes.normalize_()
        return loss.detach()
