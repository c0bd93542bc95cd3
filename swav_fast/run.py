"""The composition root: a config in, a runnable training run out.

:func:`build_run` is the one place that puts a run together, in this order::

    cfg      = resolve_batch(cfg, world)          # check_config(cfg, world) first
    loader   = build_loader(data, spec, batch)    # what the step reads (spec_for_step)
    method   = build_method(cfg)                  # online network + objective state, on the device
    optim    = build_optimizer(cfg, method)       # LARS or SGD over method.trainable()
    step     = TrainStep(ddp_wrap(method), optim) # eager | compile | graph

:class:`swav_fast.train.Trainer` (the loop), ``swav-fast eval``, the benchmarks and the tests build
from here, so that each sees the same model, optimiser and loader for the same config.

Config checks are split in two: :meth:`Config.validate` (pure: values and combinations) and
:func:`check_choices` (names that must be registered: method, loader backend, trunk, step mode);
:func:`check_config` runs both, plus the method's own check, before any work.
"""
from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pipelines.options import BackendOptions
from swav_fast.config import Config, check_choice, per_process_batch, resolve_batch
from swav_fast.errors import ConfigError, DataError
from swav_fast.step_modes import STEP_MODES

log = logging.getLogger("swav_fast")


# -- small pieces ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N`` (ConfigError without CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synthetic_root(cfg: Config) -> Path:
    """Generate (once, cached) and return the built-in dataset folder with ``train/`` and ``val/``."""
    from swav_fast.data.synthetic import generate_synthetic

    s = cfg.data.synthetic
    w, h = s.size
    kind = "" if s.kind == "photo" else f"{s.kind}-"  # the photo kind keeps its older folder name
    root = Path(os.path.expanduser(s.cache_dir)) / (
        f"synthetic-{kind}c{s.classes}-n{s.train_images}-v{s.val_images}-{w}x{h}-s{s.seed}")
    generate_synthetic(root / "train", s.train_images, s.classes, (w, h), seed=s.seed,
                       progress=cfg.train.progress, kind=s.kind)
    generate_synthetic(root / "val", s.val_images, s.classes, (w, h), seed=s.seed + 7919,
                       progress=cfg.train.progress, kind=s.kind)
    return root


def loader_options(cfg: Config) -> BackendOptions | None:
    """The chosen loader backend's options (``data.<backend>.*``)."""
    return cfg.data.loader_options()


def build_model(cfg: Config) -> torch.nn.Module:
    """The online network (with ``.trunk``) of ``cfg``'s method, as saved under ``"model"``."""
    from swav_fast.methods import build_method

    return build_method(cfg.train.method, cfg).model


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """LARS (``optim.lars``) or SGD over ``model``'s parameters, with ``optim.*``'s settings."""
    from swav_fast.methods import exclude_bias_and_norm
    from swav_fast.optim import LARS, lars_param_groups

    o = cfg.optim
    groups = lars_param_groups(model, exclude_bias_and_norm(cfg))  # auto: the method's own convention
    if o.lars:
        return LARS(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.trust_coefficient)
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay)


# -- checks that need the registries ---------------------------------------------------------------------
def registry_names() -> dict[str, list[str]]:
    """The config keys that name a registered implementation, and the names registered for each."""
    from pipelines.loader import BACKENDS
    from swav_fast.methods import available_methods
    from swav_fast.models.trunks import TRUNKS

    return {"model.arch": TRUNKS.names(), "data.loader": BACKENDS.names(),
            "train.method": available_methods(), "train.step_mode": STEP_MODES.names()}


def check_choices(cfg: Config) -> None:
    """ConfigError naming the valid entries when ``cfg`` names an unregistered method, loader backend,
    trunk or step mode."""
    values = {"model.arch": cfg.model.arch, "data.loader": cfg.data.loader, "train.method": cfg.train.method,
              "train.step_mode": cfg.train.step_mode}
    for key, valid in registry_names().items():
        check_choice(key, values[key], valid)


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Everything that can be said about ``cfg`` before any work, for ``world_size`` processes: its
    values (:meth:`Config.validate`), its registered names (:func:`check_choices`) and the method's own
    requirements (views, settings). Changes nothing."""
    from swav_fast.methods import validate_method

    check_choices(cfg)
    cfg.validate(world_size)
    validate_method(cfg.train.method, cfg)


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A composed run: what the training loop drives. ``step`` drives ``method`` (through the DDP
    wrapper under several processes); everything else (state dicts, trunk, hooks) uses the bare
    ``method``."""
    cfg: Config  # the resolved config (per-process batch filled in): what config.yaml and checkpoints hold
    device: torch.device
    world: int
    rank: int
    data_path: Path
    knn_data: Path | None  # train/ + val/ for the end-of-run kNN (the synthetic set's by default)
    loader: Any  # a pipelines.MultiCropLoader
    method: Any  # a swav_fast.methods.Method
    optimizer: torch.optim.Optimizer
    step: Any  # a swav_fast.step.TrainStep
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch: int  # images per step over all processes
    lr_factor: float  # optim.lr_scaling's multiplier of the learning rates
    channels_last: bool

    @property
    def model(self) -> torch.nn.Module:
        """The online network (trunk + heads)."""
        return self.method.model

    def lr_at(self, step: int, scale: float = 1.0) -> float:
        """The learning rate of iteration ``step`` (warm-up then cosine), times ``scale`` (rollbacks)."""
        from swav_fast.optim import warmup_cosine_lr

        o, f = self.cfg.optim, self.lr_factor * scale
        return warmup_cosine_lr(step, self.total_steps, self.warmup_steps, f * o.base_lr, f * o.final_lr,
                                f * o.start_warmup)


def _log_lr_scaling(cfg: Config, lr_factor: float, global_batch: int, world: int) -> None:
    o = cfg.optim
    if lr_factor != 1.0:
        log.info("learning rates x %.4g (optim.lr_scaling=%s: global batch %d vs reference %d)",
                 lr_factor, o.lr_scaling, global_batch, o.reference_batch)
    elif o.lr_scaling == "none" and o.reference_batch and o.reference_batch != global_batch:
        log.warning("the learning rates are given for a global batch of %d but this run's is %d "
                    "(%d per process x %d); they are used unscaled (optim.lr_scaling=none). Set "
                    "optim.global_batch_size=%d, or optim.lr_scaling=linear or sqrt", o.reference_batch,
                    global_batch, o.batch_size, world, o.reference_batch)


M = TypeVar("M", bound=torch.nn.Module)


def place(module: M, device: torch.device, channels_last: bool) -> M:
    """``module`` on ``device``, in channels-last memory format if asked: the one layout every trunk of a
    run has (the trained one, and the random-init one kNN compares it with, so both do the same
    arithmetic)."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def build_run(cfg: Config, device: torch.device | str | None = None, world: int = 1, rank: int = 0) -> Run:
    """Compose the run of ``cfg`` for process ``rank`` of ``world`` on ``device`` (default
    ``train.device``): checks, data, method, optimiser, step. Under several processes the process group
    must exist already (:func:`swav_fast.distributed.init_distributed`)."""
    from pipelines import build_loader
    from pipelines.spec import spec_for_step
    from swav_fast import ddp
    from swav_fast.methods import build_method
    from swav_fast.step import TrainStep

    check_config(cfg, world)
    cfg = resolve_batch(cfg, world)
    t, o = cfg.train, cfg.optim
    device = resolve_device(t.device) if device is None else torch.device(device)
    seed_everything(t.seed)

    # data: the loader writes what the step reads (bf16 channels-last views for a bf16 CUDA step)
    knn_data = Path(cfg.eval.knn_data) if cfg.eval.knn_data else None
    if cfg.data.path:
        data_path = Path(cfg.data.path)
    else:
        root = synthetic_root(cfg)
        data_path, knn_data = root / "train", knn_data or root
    channels_last = t.channels_last  # CPU too: oneDNN convolutions are faster in NHWC
    spec = spec_for_step(cfg.data.crops, device, t.precision, channels_last)
    loader = build_loader(data_path, spec, o.batch_size, backend=cfg.data.loader, device=device, rank=rank,
                          world_size=world, seed=t.seed, num_workers=cfg.data.workers,
                          options=loader_options(cfg))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(f"{data_path} has fewer images ({loader.num_samples}) than one batch "
                        f"({o.batch_size})")
    global_batch, lr_factor = o.batch_size * world, o.lr_factor(world)
    _log_lr_scaling(cfg, lr_factor, global_batch, world)
    total_steps = o.epochs * steps_per_epoch

    # method (online network + objective state), optimiser, step
    torch.manual_seed(t.seed)  # the same seed gives the same init (Trainer.evaluate_knn relies on it)
    method = build_method(t.method, cfg)
    method.on_train_start(loader.dataset_size, total_steps)  # indices are global
    method = place(method, device, channels_last)
    if cfg.model.sync_bn and world > 1:  # batch statistics of the global batch
        method.convert_sync_batchnorm_(functools.partial(ddp.convert_sync_batchnorm, device=device))
    optimizer = build_optimizer(cfg, method.trainable())
    step_method = ddp.wrap_method(method, device, cfg.dist.find_unused_parameters) if world > 1 else method
    step = TrainStep(step_method, optimizer, device, t.precision, channels_last, mode=t.step_mode,
                     debug_nan_steps=t.debug_nan_steps)
    return Run(cfg, device, world, rank, data_path, knn_data, loader, method, optimizer, step, steps_per_epoch,
               total_steps, int(round(o.warmup_epochs * steps_per_epoch)), global_batch, lr_factor,
               channels_last)


__all__ = ["Run", "build_model", "build_optimizer", "build_run", "check_choices", "check_config",
           "loader_options", "per_process_batch", "place", "registry_names", "resolve_device",
           "seed_everything", "synthetic_root"]
