"""The contract between a self-supervised method and the training step.

A :class:`Method` owns everything one objective needs: the *online* network ``self.model`` (trained
by the optimiser; it has a ``trunk`` that evaluation and export use) and any extra state (target
networks, feature queues, memory banks, centres) as sub-modules or buffers. The training step
(:class:`swav_fast.step.TrainStep`) calls, per iteration::

    loss = method(views, indices)        # under autocast; returns a float32 scalar
    loss.backward()
    method.before_update(step)           # gradients are in .grad
    optimizer.step()                     # parameters of frozen_parameters() not updated while frozen
    method.after_update(step)            # e.g. re-normalise prototypes, EMA target, memory bank

``step`` is the global iteration as a 0-d int64 tensor on the training device, so the hooks must
be written with tensor ops (``torch.where``, no ``if step < n`` on a tensor) to stay replayable in a
CUDA graph. Only ``model``'s parameters are given to the optimiser (:meth:`trainable`); target
networks keep ``requires_grad=False``.

Checkpoints store ``model.state_dict()`` under ``"model"`` and the rest of the method's state
(:meth:`extra_state_dict`) under ``"objective"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from swav_fast.errors import ConfigError


@dataclass
class HealthReport:
    """What a method's :meth:`Method.health` saw at one check (a log step).

    ``ok`` False means a sign of failure (e.g. SwAV's codes collapsed onto one prototype); the run's
    health checker counts consecutive failed checks (``train.collapse_patience``), writes ``signals``
    to metrics.jsonl under the record type ``kind`` and, on the first failed check, logs ``message``
    (one line: what was seen and what to try)."""
    ok: bool
    signals: dict[str, Any]  # JSON-serialisable numbers / lists, logged as they are
    message: str = ""
    kind: str = "collapse"


def per_view(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """``[V*B, ...]`` rows in view order as ``[V, B, ...]`` (a view, no copy)."""
    return x.reshape(num_views, -1, *x.shape[1:])


class Method(nn.Module):
    """Base class: subclasses set ``self.model`` and implement :meth:`forward`."""

    #: registry name (``--method``)
    name: str = "base"
    model: nn.Module

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        """The loss (float32 scalar) for all ``views`` (``[B, 3, S, S]`` each, globals first) of the
        samples with dataset ``indices`` (``[B]``, used by memory banks)."""
        raise NotImplementedError

    def frozen_parameters(self) -> list[tuple[list[nn.Parameter], int]]:
        """``(parameters, n)`` pairs: these parameters get no optimiser update (no gradient, no
        momentum, no weight decay) while the iteration is below ``n`` (SwAV's prototypes, DINO's last
        layer). The step applies it, so that every step mode has the same semantics."""
        return []

    def before_update(self, step: torch.Tensor) -> None:
        """After backward, before the optimiser step (gradients are in ``.grad``)."""

    def after_update(self, step: torch.Tensor) -> None:
        """After the optimiser step."""

    def set_fused(self, enabled: bool) -> None:
        """Compiled step modes ask for the method's fused loss kernels (if it has any)."""

    def convert_sync_batchnorm_(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        """``model.sync_bn`` under several processes: ``convert`` (e.g.
        :func:`swav_fast.ddp.convert_sync_batchnorm`) every sub-module's batch norms, the online network's
        and the target networks' alike (MoCo v3, BYOL and DINO synchronise both). A method whose target
        must keep per-rank statistics overrides this (MoCo v2's shuffle BN)."""
        for name, child in self.named_children():
            setattr(self, name, convert(child))

    def on_train_start(self, num_samples: int, total_steps: int) -> None:
        """Sizes known only once the loader exists: the training set (a memory bank's rows) and the
        run's length (a momentum schedule's end). Called by the trainer before any resume."""

    def health(self, step: int, loss: float) -> HealthReport | None:
        """Method-specific signs of failure at a log step (may synchronise with the device: it runs at
        log steps only); ``None`` when the method has nothing to check at this step."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Host-side switches that change once per epoch (e.g. start using a queue)."""

    @property
    def trunk(self) -> nn.Module:
        return self.model.trunk

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimiser updates."""
        return self.model

    def extra_state_dict(self) -> dict[str, Any]:
        """Everything in the state dict except the online model (saved as ``"objective"``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        full = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        full.update(state)
        self.load_state_dict(full)


MethodFactory = Callable[..., Method]
ConfigCheck = Callable[[Any], None]


@dataclass(frozen=True)
class _Entry:
    factory: MethodFactory
    min_views: int
    check: ConfigCheck | None


_METHODS: dict[str, _Entry] = {}


def register_method(name: str, *, min_views: int = 2,
                    check: ConfigCheck | None = None) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register ``factory(cfg) -> Method`` under ``name``.

    ``min_views`` is the fewest views per sample the method can learn from (2 for every method that
    compares views of one image); ``check(cfg)`` raises :class:`ConfigError` for settings of the
    method that the config alone shows to be impossible. Both run in :func:`validate_method`, from
    ``Config.validate`` (before any work) and from :func:`build_method`."""

    def deco(factory: MethodFactory) -> MethodFactory:
        _METHODS[name] = _Entry(factory, min_views, check)
        return factory

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def _entry(name: str) -> _Entry:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    return _METHODS[name]


def validate_method(name: str, cfg: Any) -> None:
    """ConfigError when ``cfg`` gives method ``name`` too few views or settings it rejects."""
    entry = _entry(name)
    crops = list(cfg.data.crops.num_crops)
    if sum(crops) < entry.min_views:
        reason = " (it compares views of the same image)" if entry.min_views >= 2 else ""
        raise ConfigError(f"data.crops must give at least {entry.min_views} views for train.method={name}"
                          f"{reason}, but data.crops.num_crops={crops} gives {sum(crops)}")
    if entry.check is not None:
        entry.check(cfg)


def build_method(name: str, cfg: Any) -> Method:
    """The method ``name`` built from a :class:`swav_fast.config.Config` (validated first)."""
    validate_method(name, cfg)
    return _entry(name).factory(cfg)
