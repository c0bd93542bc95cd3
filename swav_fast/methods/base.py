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

from pipelines.registry import Registry
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

#: LARS conventions (:func:`swav_fast.optim.lars_param_groups`): ``all`` = LARC over every parameter,
#: biases and norm weights included, weight decay on all (official SwAV, InstDisc's lemniscate, MoCo v2,
#: SimSiam); ``exclude_bias_and_norm`` = biases and norm weights get neither adaptation nor weight decay
#: (SimCLR, BYOL, Barlow Twins, MoCo v3, DINO).
LARS_CONVENTIONS = ("all", "exclude_bias_and_norm")


@dataclass(frozen=True)
class MethodInfo:
    """Everything a method declares about itself at registration (:func:`register_method`).

    ``heads`` are the paper's ResNet-50 projector sizes ``(model.hidden_dim, model.feat_dim)`` used when
    the config leaves them unset; ``optim`` is the official code's LARS convention (one of
    :data:`LARS_CONVENTIONS`), used when ``optim.exclude_bias_and_norm=auto``; ``config`` is its
    ``methods.<name>`` dataclass (torch-free, in :mod:`swav_fast.methods.configs`); ``state`` and
    ``ddp`` say in a line what it checkpoints besides the online network and what is per rank or
    gathered under several processes (docs/methods.md lists them)."""
    factory: MethodFactory
    min_views: int = 2
    check: ConfigCheck | None = None
    optim: str = "exclude_bias_and_norm"
    heads: tuple[int, int] = (2048, 128)
    config: type | None = None
    paper: str = ""
    state: str = ""
    ddp: str = ""


def _load_methods() -> None:
    """Import the built-in method modules (each registers itself)."""
    import importlib

    from swav_fast import methods as package

    for module in package.method_modules():
        importlib.import_module(f"{package.__name__}.{module}")


#: name -> :class:`MethodInfo`; filled by the method modules on first lookup
METHODS: Registry[MethodInfo] = Registry("method", loader=_load_methods)


def register_method(name: str, *, min_views: int = 2, check: ConfigCheck | None = None,
                    optim: str = "exclude_bias_and_norm", heads: tuple[int, int] = (2048, 128),
                    config: type | None = None, paper: str = "", state: str = "",
                    ddp: str = "") -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register ``factory(cfg) -> Method`` under ``name`` with its :class:`MethodInfo`.

    ``min_views`` is the fewest views per sample the method can learn from (2 for every method that
    compares views of one image); ``check(cfg)`` raises :class:`ConfigError` for settings of the
    method that the config alone shows to be impossible. Both run in :func:`validate_method`, from
    ``Config.validate`` (before any work) and from :func:`build_method`."""
    if optim not in LARS_CONVENTIONS:
        raise ValueError(f"register_method({name!r}): optim={optim!r} is not one of {LARS_CONVENTIONS}")

    def deco(factory: MethodFactory) -> MethodFactory:
        METHODS.register(name, MethodInfo(factory, min_views, check, optim, tuple(heads), config, paper,
                                          state, ddp))
        return factory

    return deco


def available_methods() -> list[str]:
    return METHODS.names()


def method_info(name: str) -> MethodInfo:
    """The declaration of method ``name`` (ConfigError naming the valid ones when unknown)."""
    return METHODS.get(name)


def _entry(name: str) -> MethodInfo:
    return METHODS.get(name)


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


def head_sizes(cfg: Any, name: str | None = None) -> tuple[int, int]:
    """``(hidden_dim, feat_dim)`` of the projector: ``model.hidden_dim`` / ``model.feat_dim`` where set,
    else the method's own (the paper's) sizes from its registration."""
    hidden, feat = method_info(name or cfg.train.method).heads
    m = cfg.model
    return (hidden if m.hidden_dim is None else int(m.hidden_dim),
            feat if m.feat_dim is None else int(m.feat_dim))


def exclude_bias_and_norm(cfg: Any, name: str | None = None) -> bool:
    """Whether LARS / weight decay skip biases and norm weights: ``optim.exclude_bias_and_norm`` when
    true or false; ``auto`` = the convention of the method's official code (:attr:`MethodInfo.optim`)."""
    value = cfg.optim.exclude_bias_and_norm
    if value == "auto":
        return method_info(name or cfg.train.method).optim == "exclude_bias_and_norm"
    return bool(value)


def build_method(name: str, cfg: Any) -> Method:
    """The method ``name`` built from a :class:`swav_fast.config.Config` (validated first)."""
    validate_method(name, cfg)
    return _entry(name).factory(cfg)
