"""SwAV pretraining, readable top to bottom: data, model, objective, optimiser, loop, checkpoints.

Library entry point: :func:`train` (the ``swav-fast train`` command is a thin layer over it).

Faults: NaN/inf steps are skipped on the device and counted (:mod:`swav_fast.guards`), too many in
a row stop the run; collapse signs are reported; SIGTERM/SIGINT write a checkpoint and return
(:mod:`swav_fast.preemption`); a failed checkpoint write keeps the previous one and stops or
continues per ``train.on_checkpoint_error``; ``resume("auto")`` takes the newest checkpoint that
passes its checksum and loads.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from pipelines import build_loader
from pipelines.spec import spec_for_step
from swav_fast import checkpoint as ckpt
from swav_fast import ddp
from swav_fast.distributed import (StopAgreement, all_reduce_mean, broadcast_object, destroy, detect_launch,
                                   init_distributed, is_dist, quiet_other_ranks, rank, world_size)
from swav_fast.config import Config, save_config
from swav_fast.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from swav_fast.eval.knn import knn_due, knn_eval, periodic_knn
from swav_fast import faults
from swav_fast.guards import DivergenceDetected, DivergenceMonitor, NonFiniteCounts, weight_norm
from swav_fast.methods import Method, build_method, exclude_bias_and_norm
from swav_fast.optim import LARS, lars_param_groups, warmup_cosine_lr
from swav_fast.preemption import StopSignals
from swav_fast.runinfo import describe_run, distinct_bad_files, eta_text, progress_desc
from swav_fast.runlog import RunLog
from swav_fast.step import TrainStep
from swav_fast.threads import set_cpu_threads

log = logging.getLogger("swav_fast")
T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
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
    root = Path(os.path.expanduser(s.cache_dir)) / (
        f"synthetic-c{s.classes}-n{s.train_images}-v{s.val_images}-{w}x{h}-s{s.seed}")
    generate_synthetic(root / "train", s.train_images, s.classes, (w, h), seed=s.seed,
                       progress=cfg.train.progress)
    generate_synthetic(root / "val", s.val_images, s.classes, (w, h), seed=s.seed + 7919,
                       progress=cfg.train.progress)
    return root


def loader_options(cfg: Config) -> dict[str, Any]:
    """Backend-specific loader settings from ``cfg.data``."""
    d = cfg.data
    if d.loader == "dali":
        return {"prefetch": d.prefetch, "hw_decoder_load": d.hw_decoder_load}
    if d.loader == "torch":
        return {"prefetch": d.prefetch}
    return {}


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc


#: What makes a folder a run folder: a second run must not silently mix its files with these.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard")
#: ``--overwrite`` moves a previous run's files into ``<run>/replaced-<UTC time>/``.
REPLACED_PREFIX = "replaced-"


def existing_run(run_dir: Path) -> list[str]:
    """The run files already in ``run_dir`` (an empty ``checkpoints/`` folder does not count)."""
    found = []
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir() and not any(p.iterdir()):
            continue
        if p.exists():
            found.append(name)
    return found


def run_folder_taken(run_dir: Path, found: list[str]) -> str:
    return (f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume auto, start "
            "over with --overwrite (moves its files aside), or choose another --output")


def set_aside_run(run_dir: Path) -> Path:
    """Move the previous run's files (:data:`RUN_FILES`) to ``run_dir/replaced-<UTC time>/``; nothing is
    deleted. Returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = run_dir / f"{REPLACED_PREFIX}{stamp}"
    k = 1
    while aside.exists():
        k += 1
        aside = run_dir / f"{REPLACED_PREFIX}{stamp}-{k}"
    try:
        aside.mkdir()
        for name in existing_run(run_dir):
            os.replace(run_dir / name, aside / name)
    except OSError as exc:
        raise DataError(f"cannot move the previous run in {run_dir} aside: {exc.strerror or exc}") from exc
    return aside


def build_model(cfg: Config) -> torch.nn.Module:
    """The online network (with ``.trunk``) of ``cfg``'s method, as saved under ``"model"``."""
    return build_method(cfg.train.method, cfg).model


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = lars_param_groups(model, exclude_bias_and_norm(cfg))  # auto: the method's own convention
    if o.lars:
        return LARS(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.trust_coefficient)
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay)


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    epochs: int
    seconds: float
    images_per_s: float
    last_loss: float
    bad_images: int = 0  # unreadable images skipped (replaced) by the loader
    nonfinite_steps: int = 0  # steps skipped because the loss or a gradient was NaN/inf
    signal: int | None = None  # set when SIGTERM/SIGINT stopped the run (a checkpoint was written)
    knn: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True  # rank 0 (or the only process): the one that reports


def until_stopped(batches: Iterable[T], stop: StopAgreement) -> Iterator[T]:
    """``batches`` until a stop is agreed; a loader failure after a local request (its workers got
    the same signal) also ends the epoch. Every rank calls ``stop.agree()`` once per batch, after
    fetching it, so all ranks stop before the same step whichever of them got the signal."""
    it = iter(batches)
    while not stop.requested:
        try:
            item = next(it)
        except StopIteration:  # the same batch count on every rank: all end together
            return
        except Exception:
            if not stop.local.requested:
                raise
            log.info("data loader stopped after %s", stop.local.name)
            item = None
        if stop.agree():
            return
        yield item


class Trainer:
    """Holds a run's state; :meth:`fit` runs it. Build from a validated :class:`Config`."""

    def __init__(self, cfg: Config, overwrite: bool = False):
        t = cfg.train
        # a folder that already holds a run is refused by fit() unless resumed or ``overwrite``
        self.overwrite, self._continuing, self._claimed = overwrite, False, False
        # the launcher's world size (torchrun / srun variables, or 1) is known before any group exists
        self.cfg = cfg.validate(world_size() if is_dist() else detect_launch().world_size)
        # one process, or a rank of that launch (device of the local rank, NCCL or gloo)
        self.device, self.owns_process_group = init_distributed(t.device, cfg.dist.backend,
                                                                cfg.dist.timeout_minutes)
        self.world, self.rank = world_size(), rank()
        self.is_main = self.rank == 0
        quiet_other_ranks()
        self.threads = set_cpu_threads(t.threads, cfg.data.workers)  # train.threads, or auto
        self.run_dir = Path(t.output_dir)
        if self.is_main:
            check_writable(self.run_dir)
            for leftover in ckpt.remove_leftovers(self.run_dir):
                log.info("removed %s (left by an interrupted checkpoint write)", leftover)
        seed_everything(t.seed)

        # data
        self.knn_data: Path | None = Path(cfg.eval.knn_data) if cfg.eval.knn_data else None
        if cfg.data.path:
            data_path = Path(cfg.data.path)
        else:
            root = synthetic_root(cfg)
            data_path = root / "train"
            self.knn_data = self.knn_data or root
        # the loader writes what the step reads (bf16 channels-last views for a bf16 CUDA step)
        loader_spec = spec_for_step(cfg.data.crops, self.device, t.precision,
                                    t.channels_last and self.device.type == "cuda")
        self.loader = build_loader(data_path, loader_spec, cfg.optim.batch_size, backend=cfg.data.loader,
                                   device=self.device, rank=self.rank, world_size=self.world, seed=t.seed,
                                   num_workers=cfg.data.workers, **loader_options(cfg))
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise DataError(f"{data_path} has fewer images ({self.loader.num_samples}) than one batch "
                            f"({cfg.optim.batch_size})")
        self.global_batch = cfg.optim.batch_size * self.world
        self.lr_factor = cfg.optim.lr_factor(self.world)
        self._check_lr_scaling()
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))

        # model, objective, optimiser, step
        torch.manual_seed(t.seed)  # the same seed gives the same init (evaluate_knn relies on it)
        self.method: Method = build_method(t.method, cfg)
        self.method.on_train_start(self.loader.dataset_size, self.total_steps)  # indices are global
        self.method = self.method.to(self.device)
        channels_last = t.channels_last and self.device.type == "cuda"
        if channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.model.sync_bn and self.world > 1:  # batch statistics of the global batch
            self.method.convert_sync_batchnorm_(functools.partial(ddp.convert_sync_batchnorm,
                                                                  device=self.device))
        self.model = self.method.model  # the online network (trunk + heads)
        self.optimizer = build_optimizer(cfg, self.method.trainable())
        # Under DDP the step drives the wrapper (gradients averaged over ranks); everything else here
        # (state dicts, trunk, hooks) uses the bare method.
        step_method = (ddp.wrap_method(self.method, self.device, cfg.dist.find_unused_parameters)
                       if self.world > 1 else self.method)
        self.step_fn = TrainStep(step_method, self.optimizer, self.device, t.precision, channels_last,
                                 mode=t.step_mode, debug_nan_steps=t.debug_nan_steps)
        self.health_streak = 0  # consecutive failed method.health() checks (train.collapse_patience)
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.last_loss = float("nan")  # at the last log step with a finite loss
        self.images = 0  # trained this fit()
        self._nonfinite_reported = 0
        self._save_attempted_at: int | None = None  # one checkpoint attempt per step
        # divergence: checked at log steps and before checkpoints; rollbacks lower the LR by lr_scale
        self.divergence = DivergenceMonitor(t.divergence_loss_factor, t.divergence_norm_factor)
        self.rollbacks, self.lr_scale = 0, 1.0
        self._blowup_steps = frozenset(t.debug_blowup_steps)  # testing only
        self.runlog = RunLog(self.run_dir, t.tensorboard, enabled=self.is_main)

    def _check_lr_scaling(self) -> None:
        o = self.cfg.optim
        if self.lr_factor != 1.0:
            log.info("learning rates x %.4g (optim.lr_scaling=%s: global batch %d vs reference %d)",
                     self.lr_factor, o.lr_scaling, self.global_batch, o.reference_batch)
        elif o.lr_scaling == "none" and o.reference_batch and o.reference_batch != self.global_batch:
            log.warning("the learning rates are given for a global batch of %d but this run's is %d "
                        "(%d per process x %d); they are used unscaled (optim.lr_scaling=none). Set "
                        "optim.global_batch_size=%d, or optim.lr_scaling=linear or sqrt", o.reference_batch,
                        self.global_batch, o.batch_size, self.world, o.reference_batch)

    def close(self, barrier: bool = False) -> None:
        """End the process group if this trainer created it (from the launcher's environment); with
        ``barrier`` (a clean end) after every rank got here."""
        if self.owns_process_group:
            destroy(barrier)
            self.owns_process_group = False

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's state; a collective under ``torch.distributed`` (per-rank state is gathered)."""
        extra = self.method.extra_state_dict()
        _, own = ddp.split_per_rank(extra, ddp.per_rank_prefixes(self.method))
        return {
            "format": "swav-fast/1",
            "model": self.model.state_dict(),
            "objective": extra,
            "objective_ranks": ddp.gather_per_rank(own),  # e.g. every rank's feature queue
            "world_size": self.world, "global_batch": self.global_batch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.step_fn.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "rng": ckpt.rng_state(),
            "nonfinite": self.step_fn.guard.state_dict(),
            "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint; from another world size the per-rank state (queue) is reset and the
        position in the epoch is converted (same samples seen), with a warning."""
        saved_world = int(state.get("world_size", 1))
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_extra_state_dict(self._objective_state(state, saved_world))
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.step_fn.scaler.load_state_dict(state["scaler"])
            if "nonfinite" in state:
                self.step_fn.guard.load_state_dict(state["nonfinite"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not match this config/model: "
                                  f"{str(exc).splitlines()[0]}") from exc
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.rollbacks, self.lr_scale = int(state.get("rollbacks", 0)), float(state.get("lr_scale", 1.0))
        ckpt.set_rng_state(state["rng"])
        self._nonfinite_reported = self.step_fn.guard.counts().total
        saved_global = int(state.get("global_batch") or state["config"]["optim"]["batch_size"] * saved_world)
        if saved_global != self.global_batch:
            self._convert_position(saved_global)

    def _objective_state(self, state: dict[str, Any], saved_world: int) -> dict[str, Any]:
        """The method's extra state to load: shared entries from the checkpoint, per-rank ones from
        this rank's saved copy (same world size) or freshly reset (another world size)."""
        prefixes = ddp.per_rank_prefixes(self.method)
        shared, own = ddp.split_per_rank(state["objective"], prefixes)
        if not prefixes:
            return shared
        if saved_world == self.world:
            ranks = state.get("objective_ranks")
            return {**shared, **(ranks[self.rank] if ranks else own)}
        ddp.reset_per_rank(self.method)
        log.warning("the checkpoint was written by %d process(es), this run has %d: the per-rank state %s "
                    "is reset (a feature queue refills before it is used again); everything else is restored",
                    saved_world, self.world, ", ".join(p.rstrip(".") for p in prefixes))
        _, fresh = ddp.split_per_rank(self.method.extra_state_dict(), prefixes)
        return {**shared, **fresh}

    def _convert_position(self, saved_global: int) -> None:
        """Another global batch: keep the samples already seen in this epoch (``batch_in_epoch`` x
        global batch) and put ``step`` where this run's schedule has the same epoch position."""
        seen = self.batch_in_epoch * saved_global
        old = (self.step, self.batch_in_epoch)
        self.batch_in_epoch = min(seen // self.global_batch, self.steps_per_epoch)
        self.step = self.epoch * self.steps_per_epoch + self.batch_in_epoch
        log.warning("the checkpoint's global batch was %d, this run's is %d: step %d (batch %d of epoch %d) "
                    "becomes step %d (batch %d); the learning-rate schedule and prototype freezing count "
                    "this run's steps", saved_global, self.global_batch, old[0], old[1], self.epoch,
                    self.step, self.batch_in_epoch)

    def _healthy_checkpoint(self) -> Path | None:
        """The newest checkpoint written no later than the last passed divergence check."""
        ok = [p for p in ckpt.list_checkpoints(self.run_dir)
              if ckpt.checkpoint_step(p) <= self.divergence.healthy_step]
        return ok[-1] if ok else None

    def _last_checkpoint_note(self) -> str:
        healthy = self._healthy_checkpoint()
        if healthy is not None:
            return f"the last checkpoint {healthy} is intact (it passed the divergence checks)"
        return "no checkpoint that passed the health checks was written"

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current state (refused once the run has diverged); on a write failure the
        previous checkpoint stays and ``train.on_checkpoint_error`` says whether to stop."""
        self.check_divergence(None)
        self.check_nonfinite()
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        if self._save_attempted_at == self.step:  # e.g. a step that is also an epoch end
            return path if path.exists() else None
        self._save_attempted_at = self.step
        state = self.state_dict()  # every rank (gathers the per-rank state); rank 0 writes
        error = None
        if self.is_main:
            try:
                ckpt.atomic_save(state, path, checksum=True)
            except CheckpointError as exc:
                error = str(exc)
        error = broadcast_object(error)  # every rank follows rank 0's outcome
        if error is not None:
            self._checkpoint_failed(path, CheckpointError(error))
            return None
        if self.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self.runlog.write("checkpoint", step=self.step, epoch=self.epoch, path=str(path))
        return path

    def _checkpoint_failed(self, path: Path, exc: CheckpointError) -> None:
        policy, kept = self.cfg.train.on_checkpoint_error, self._last_checkpoint_note()
        self.runlog.write("checkpoint_error", step=self.step, epoch=self.epoch, path=str(path), error=str(exc),
                          policy=policy)
        if policy == "stop":
            raise CheckpointError(f"{exc}; {kept}. Stopping (train.on_checkpoint_error=stop): free space or "
                                  "fix the folder, then continue with --resume auto") from exc
        log.error("%s; %s; training continues (train.on_checkpoint_error=continue)", exc, kept)

    # -- health --------------------------------------------------------------------------------
    def check_divergence(self, loss: float | None) -> None:
        """Raise :class:`DivergenceDetected` when the loss (if given) or the weight norm has run away
        (a host synchronisation: called at log steps and before checkpoints)."""
        reason = self.divergence.check(self.step, loss, weight_norm(self.model.parameters()))
        if reason is not None:
            raise DivergenceDetected(self.step, reason)

    def _divergence_stop(self, exc: DivergenceDetected, why: str) -> TrainingDiverged:
        msg = (f"training diverged at step {exc.step}: {exc.reason}; {why}; {self._last_checkpoint_note()}. "
               "Try a lower optim.base_lr or a longer warmup, or train.on_divergence=rollback")
        self.runlog.write("diverged", step=exc.step, reason="divergence", message=msg,
                          healthy_checkpoint=str(self._healthy_checkpoint() or "") or None)
        return TrainingDiverged(msg)

    def _set_aside_diverged(self, exc: DivergenceDetected) -> None:
        """Move checkpoints written after the last passed check to ``checkpoints/diverged-step<N>/``
        (``--resume auto`` must not pick them; they are kept for a post-mortem)."""
        if not self.is_main:
            return
        moved, aside = ckpt.move_checkpoints_above(self.run_dir, self.divergence.healthy_step,
                                                   f"diverged-step{exc.step}")
        if moved:
            log.warning("moved %d checkpoint(s) written after step %d (the divergence) to %s", moved,
                        self.divergence.healthy_step, aside)

    def handle_divergence(self, exc: DivergenceDetected) -> None:
        """``train.on_divergence``: stop (TrainingDiverged naming the healthy checkpoint), or roll back to
        the newest checkpoint from before the divergence, skip the batches up to ``exc.step`` and
        multiply the learning rate by ``train.rollback_lr_factor``."""
        t = self.cfg.train
        self._set_aside_diverged(exc)
        healthy = broadcast_object(str(self._healthy_checkpoint() or "") if self.is_main else None)
        if t.on_divergence != "rollback":
            raise self._divergence_stop(exc, "train.on_divergence=stop")
        if self.rollbacks >= t.max_rollbacks:
            raise self._divergence_stop(exc, f"{self.rollbacks} rollback(s) already (train.max_rollbacks)")
        if not healthy:
            raise self._divergence_stop(exc, "nothing to roll back to")
        rollbacks, lr_scale = self.rollbacks + 1, self.lr_scale * t.rollback_lr_factor
        self.load_state_dict(ckpt.load_checkpoint(healthy))
        restored = self.step
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        # skip the batches that led to the divergence: the data position jumps to where it was detected
        self.step = min(exc.step, self.total_steps)
        self.epoch, self.batch_in_epoch = divmod(self.step, self.steps_per_epoch)
        self._save_attempted_at = None
        self.divergence.reset(self.step, weight_norm(self.model.parameters()))
        log.warning("step %d: %s; rolled back to %s (step %d), skipping the batches of steps %d-%d, "
                    "learning rate x %.4g (rollback %d of at most %d)", exc.step, exc.reason, healthy,
                    restored, restored + 1, exc.step, self.lr_scale, self.rollbacks, t.max_rollbacks)
        self.runlog.write("rollback", step=self.step, detected_at=exc.step, reason=exc.reason,
                          checkpoint=healthy, restored_step=restored, skipped_steps=[restored + 1, exc.step],
                          lr_scale=self.lr_scale, rollbacks=self.rollbacks)

    def check_nonfinite(self) -> NonFiniteCounts:
        """Report newly skipped NaN/inf steps; raise TrainingDiverged after too many in a row."""
        counts = self.step_fn.guard.counts()
        if counts.total > self._nonfinite_reported:
            log.warning("step %d: %d NaN/inf step(s) skipped since the last check (%d in all)", self.step,
                        counts.total - self._nonfinite_reported, counts.total)
            self.runlog.write("nonfinite", step=self.step, skipped=counts.total - self._nonfinite_reported,
                              total=counts.total, streak=counts.streak)
            self._nonfinite_reported = counts.total
        limit = self.cfg.train.max_nonfinite_steps
        if limit and counts.worst_streak >= limit:
            msg = (f"the loss was NaN/inf for {counts.worst_streak} consecutive steps by step {self.step} "
                   f"(train.max_nonfinite_steps={limit}); those steps were skipped and "
                   f"{self._last_checkpoint_note()}. Try a lower optim.base_lr or a longer warmup, "
                   "train.precision=bf16 or fp32 instead of fp16, or check the data")
            self.runlog.write("diverged", step=self.step, reason="nonfinite", message=msg)
            raise TrainingDiverged(msg)
        return counts

    def check_health(self, loss: float) -> None:
        """The method's own signs of failure (:meth:`Method.health`, e.g. SwAV's collapsed codes): a failed
        check is logged under the report's kind; TrainingDiverged after ``train.collapse_patience`` failed
        checks in a row."""
        report = self.method.health(self.step, loss)
        if report is None:  # nothing to check at this step
            return
        if report.ok:
            self.health_streak = 0
            return
        self.health_streak += 1
        self.runlog.write(report.kind, step=self.step, **report.signals)
        if self.health_streak == 1:
            log.warning("step %d: %s", self.step, report.message)
        patience = self.cfg.train.collapse_patience
        if patience and self.health_streak >= patience:
            msg = (f"stopped at step {self.step} after {self.health_streak} consecutive {report.kind} checks "
                   f"(train.collapse_patience={patience}); {self._last_checkpoint_note()}. {report.message}")
            self.runlog.write("diverged", step=self.step, reason=report.kind, message=msg)
            raise TrainingDiverged(msg)

    def resume(self, how: str) -> bool:
        """``auto``: newest loadable checkpoint of the run folder (none: start fresh); else a path.
        Under ``torch.distributed`` rank 0 chooses and every rank loads that file."""
        self._continuing = True  # the run folder's files are this run's own
        if how == "auto":
            found = ckpt.latest_valid_checkpoint(self.run_dir, log=log.warning) if self.is_main else None
            chosen = broadcast_object(str(found[0]) if found else None)
            if chosen is None:
                log.info("no checkpoint in %s: starting from scratch", self.run_dir)
                return False
            path, state = (found if found else (Path(chosen), ckpt.load_checkpoint(chosen)))
        else:
            path, state = Path(how), ckpt.load_checkpoint(how)
        step_before = state["step"]
        self.load_state_dict(state)
        if self.is_main and self.step < step_before:
            self._set_aside_newer_checkpoints(int(state.get("world_size", 1)))
        log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)
        self.runlog.write("resume", step=self.step, epoch=self.epoch, path=str(path))
        return True

    # -- loop ----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        f = self.lr_factor
        f *= self.lr_scale  # lowered by rollbacks (train.rollback_lr_factor)
        return warmup_cosine_lr(step, self.total_steps, self.warmup_steps, f * o.base_lr, f * o.final_lr,
                                f * o.start_warmup)

    def _set_aside_newer_checkpoints(self, saved_world: int) -> None:
        """After a resume that renumbered the steps downwards, checkpoints numbered above the new step
        would shadow this run's (for ``--resume auto`` and pruning): move them to a sub-folder."""
        moved, aside = ckpt.move_checkpoints_above(self.run_dir, self.step,
                                                   f"before-resize-world{saved_world}")
        if moved:
            log.warning("moved %d checkpoint(s) numbered above step %d to %s", moved, self.step, aside)

    def _claim_run_dir(self) -> None:
        """Refuse a folder that already holds another run, unless resumed or ``overwrite`` (which moves
        the previous run aside first); rank 0 decides for all."""
        if self._claimed:
            return
        error = None
        if self.is_main and not self._continuing:
            found = existing_run(self.run_dir)
            if found and self.overwrite:
                aside = set_aside_run(self.run_dir)
                log.warning("--overwrite: moved the previous run's %s to %s", ", ".join(found), aside)
                self.runlog.write("overwrite", moved_to=str(aside))
            elif found:
                error = run_folder_taken(self.run_dir, found)
        error = broadcast_object(error)
        if error is not None:
            raise ConfigError(error)
        self._claimed = True

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return self.step >= self.total_steps or bool(max_steps and self.step >= max_steps)

    def fit(self) -> TrainResult:
        """Train to the end (or ``train.max_steps``, or a SIGTERM/SIGINT: checkpoint and return)."""
        cfg = self.cfg
        self._claim_run_dir()
        try:
            if self.is_main:
                save_config(cfg, self.run_dir / "config.yaml")
        except OSError as exc:
            raise DataError(f"cannot write {self.run_dir / 'config.yaml'}: {exc.strerror or exc}") from exc
        start_time, start_step, self.images = time.perf_counter(), self.step, 0
        self._fit_start = (start_time, start_step)  # for the progress bar's ETA
        if self.is_main:
            log.info("run:\n  %s", "\n  ".join(describe_run(self)))
        self.runlog.write("start", step=self.step, epoch=self.epoch,
                          resumed=self._continuing and self.step > 0)
        try:
            self.divergence.reset(self.step, weight_norm(self.model.parameters()))  # trusted start
            with StopSignals() as signals:
                stop = StopAgreement(signals)  # all ranks stop at the same step
                while True:
                    try:
                        while not self._done() and not stop.agree():  # also agreed between epochs
                            self._run_epoch(stop)
                        if not broadcast_object(ckpt.checkpoint_path(self.run_dir, self.step).exists()):
                            self.save_checkpoint()
                        break
                    except DivergenceDetected as exc:  # every rank sees it at the same step
                        self.handle_divergence(exc)  # stops (TrainingDiverged) or rolls back
            seconds = time.perf_counter() - start_time
            # a checkpoint at an epoch's last step holds that epoch as unfinished (batch_in_epoch full)
            epochs = self.epoch + int(self.batch_in_epoch >= self.steps_per_epoch)
            result = TrainResult(str(self.run_dir), self.step, epochs, seconds,
                                 self.images / max(seconds, 1e-9) if self.step > start_step else 0.0,
                                 self.last_loss, distinct_bad_files(self.loader),
                                 self.step_fn.guard.counts().total,
                                 stop.signum, is_main=self.is_main)
            if stop.requested:
                log.warning("stopped by %s at step %d; continue with --resume auto", stop.name, self.step)
                self.runlog.write("preempted", step=self.step, epoch=self.epoch, signal=stop.name)
                return result
            if cfg.eval.at_end and self.knn_data is not None and self.is_main:
                result.knn = self.evaluate_knn()
            self.runlog.write("done", **{k: v for k, v in result.__dict__.items()
                                         if k not in ("knn", "is_main")},
                              step_mode=self.step_fn.stats.as_dict())  # incl. compile / capture seconds
            return result
        finally:
            self.runlog.close()

    def _run_epoch(self, stop: StopAgreement) -> None:
        """The rest of the current epoch (from ``batch_in_epoch``), up to max_steps or a stop request."""
        cfg, t = self.cfg, self.cfg.train
        batch = self.global_batch  # images per step over all ranks
        epoch_start_step = self.step
        self.method.on_epoch_start(self.epoch)
        self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                   disable=not (t.progress and self.is_main), dynamic_ncols=True, leave=False,
                   desc=progress_desc(self.epoch, cfg.optim.epochs))
        tick, tick_images = time.perf_counter(), 0
        wait, fetch_start = 0.0, tick  # time spent waiting for the loader since the last log step
        for data in until_stopped(self.loader, stop):
            wait += time.perf_counter() - fetch_start
            lr = self.lr_at(self.step)
            if self._blowup_steps:
                faults.blow_up_weights(list(self.model.parameters()), self.step, self._blowup_steps)
            loss = self.step_fn(data.views, lr, self.step, data.indices)
            self.step += 1
            self.batch_in_epoch += 1
            self.images += batch
            tick_images += batch
            bar.update(1)
            if self.step % t.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                loss_value = float(all_reduce_mean(loss))  # mean over ranks; syncs the device
                now = time.perf_counter()
                ips = tick_images / max(now - tick, 1e-9)
                wait_fraction = min(1.0, wait / max(now - tick, 1e-9))
                tick, tick_images, wait = now, 0, 0.0
                self._log_step(loss_value, lr, ips, wait_fraction, bar)
            if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self._done() or stop.requested:
                break
            fetch_start = time.perf_counter()
        bar.close()
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.runlog.write("epoch", step=self.step, epoch=self.epoch, loss=self.last_loss,
                              steps=self.step - epoch_start_step, bad_images=self.loader.num_bad)
            log.info("epoch %d done: step %d, loss %.4f, unreadable images so far %d", self.epoch, self.step,
                     self.last_loss, distinct_bad_files(self.loader))
            self.epoch += 1
            self.batch_in_epoch = 0
            if self.is_main and self.knn_data is not None and knn_due(self.epoch, cfg.eval.knn_every_epochs):
                out = periodic_knn(self.model.trunk, self.knn_data, cfg.eval, self.device)
                self.runlog.write("knn", step=self.step, epoch=self.epoch, periodic=True, **out)
                log.info("kNN top-1 after epoch %d: %.2f%%", self.epoch, out["top1"])
            if t.checkpoint_every_epochs and self.epoch % t.checkpoint_every_epochs == 0:
                self.save_checkpoint()

    def _log_step(self, loss: float, lr: float, images_per_s: float, loader_wait: float, bar: tqdm) -> None:
        """A log step (the loss is already on the host): record, check divergence, NaN streaks and
        collapse."""
        self.check_divergence(loss)
        counts = self.check_nonfinite()
        finite = math.isfinite(loss)
        if finite:
            self.last_loss = loss
        start_time, start_step = getattr(self, "_fit_start", (time.perf_counter(), self.step))
        end = min(self.total_steps, self.cfg.train.max_steps or self.total_steps)
        eta = eta_text(self.step - start_step, time.perf_counter() - start_time, end - self.step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s:.1f}", eta=eta)
        self.runlog.write("step", step=self.step, epoch=self.epoch, loss=loss if finite else None, lr=lr,
                          images_per_s=round(images_per_s, 2), loader_wait_fraction=round(loader_wait, 4),
                          bad_images=self.loader.num_bad,
                          nonfinite_steps=counts.total)
        if self.world == 1:
            self.check_health(loss)
        elif self.is_main or self.cfg.train.collapse_patience:  # rank 0 checks; its verdict is shared
            verdict = None
            if self.is_main:
                try:
                    self.check_health(loss)
                except TrainingDiverged as exc:
                    verdict = str(exc)
            if self.cfg.train.collapse_patience:
                verdict = broadcast_object(verdict)
            if verdict is not None:
                raise TrainingDiverged(verdict)

    def evaluate_knn(self) -> dict[str, Any]:
        """kNN top-1 of the trained trunk and of the same trunk at its random initialisation."""
        e = self.cfg.eval
        kw = dict(image_size=e.image_size, k=e.knn_k, temperature=e.knn_temperature,
                  batch_size=e.batch_size, device=self.device)
        trained = knn_eval(self.model.trunk, self.knn_data, **kw)
        torch.manual_seed(self.cfg.train.seed)
        random_init = knn_eval(build_model(self.cfg).to(self.device).trunk, self.knn_data, **kw)
        out = {"trained_top1": trained.top1, "random_init_top1": random_init.top1, **{
            k: v for k, v in trained.as_dict().items() if k != "top1"}}
        self.runlog.write("knn", step=self.step, **out)
        return out


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Run (or continue, with ``resume="auto"`` or a checkpoint path) a pretraining. A run folder that
    already holds a run is refused unless ``resume`` is given or ``overwrite`` (the previous run's files
    are then moved to ``<run>/replaced-<time>/``)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one")
    found = existing_run(Path(cfg.train.output_dir))
    if found and not (resume or overwrite) and not detect_launch().distributed:  # before any work
        raise ConfigError(run_folder_taken(Path(cfg.train.output_dir), found))
    trainer = Trainer(cfg, overwrite=overwrite)
    clean = False
    try:
        if resume:
            trainer.resume(resume)
        result = trainer.fit()
        clean = True
        return result
    finally:
        trainer.close(barrier=clean)
