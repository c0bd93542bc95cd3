"""SwAV (and family) pretraining: the training loop, readable top to bottom.

Library entry point: :func:`train` (the ``swav-fast train`` command is a thin layer over it). The run
is composed in :mod:`swav_fast.run` (:func:`~swav_fast.run.build_run`: loader, method, optimiser, step,
DDP wrap); its checkpoints are :class:`~swav_fast.checkpointer.Checkpointer`'s, its health checks
:class:`~swav_fast.guards.Health`'s. What is left here is the loop::

    trainer = Trainer(cfg)            # check the config, start the processes, build_run(cfg)
    trainer.resume("auto")            # optional: the newest loadable checkpoint
    trainer.fit()                     # for each epoch: for each batch: step; log; checkpoint

Faults: NaN/inf steps are skipped on the device and counted, too many in a row stop the run;
divergence stops or rolls back (``train.on_divergence``); collapse signs are reported;
SIGTERM/SIGINT write a checkpoint and return (:mod:`swav_fast.preemption`); a failed checkpoint write
keeps the previous one and stops or continues per ``train.on_checkpoint_error``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import torch
from tqdm import tqdm

from swav_fast import faults
from swav_fast.checkpointer import Checkpointer, Position
from swav_fast.config import Config, save_config
from swav_fast.distributed import (StopAgreement, all_reduce_mean, broadcast_object, destroy, detect_launch,
                                   init_distributed, is_dist, quiet_other_ranks, rank, world_size)
from swav_fast.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from swav_fast.eval.knn import knn_due, knn_eval, periodic_knn
from swav_fast.guards import DivergenceDetected, Health, NonFiniteCounts
from swav_fast.preemption import StopSignals
# moved to swav_fast.run; re-exported here for the callers that import them from swav_fast.train
from swav_fast.run import (build_model, build_optimizer, build_run, check_config, loader_options,  # noqa: F401
                           place, resolve_device, seed_everything, synthetic_root)
from swav_fast.runinfo import describe_run, distinct_bad_files, eta_text, progress_desc
from swav_fast.runlog import RunLog
from swav_fast.threads import set_cpu_threads

log = logging.getLogger("swav_fast")
T = TypeVar("T")


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
    """The training loop over a composed :class:`~swav_fast.run.Run`; :meth:`fit` runs it.

    Read in order: ``__init__`` (check, start the processes, compose), :meth:`fit` (the run),
    :meth:`_run_epoch` (one epoch), :meth:`_log_step` (a log step), then checkpoints
    (:meth:`save_checkpoint`, :meth:`resume`) and divergence (:meth:`handle_divergence`)."""

    def __init__(self, cfg: Config, overwrite: bool = False):
        t = cfg.train
        # a folder that already holds a run is refused by fit() unless resumed or ``overwrite``
        self.overwrite, self._continuing, self._claimed = overwrite, False, False
        # fail before any work: the launcher's world size (torchrun / srun variables, or 1) is known already
        check_config(cfg, world_size() if is_dist() else detect_launch().world_size)
        # one process, or a rank of that launch (device of the local rank, NCCL or gloo)
        device, self.owns_process_group = init_distributed(t.device, cfg.dist.backend, cfg.dist.timeout_minutes)
        self.world, self.rank = world_size(), rank()
        self.is_main = self.rank == 0
        quiet_other_ranks()
        self.threads = set_cpu_threads(t.threads, cfg.data.workers)  # train.threads, or auto
        self.run_dir = Path(t.output_dir)
        self.checkpoints = Checkpointer(self.run_dir, t.keep_checkpoints, self.is_main)
        if self.is_main:
            check_writable(self.run_dir)
            for leftover in self.checkpoints.remove_leftovers():
                log.info("removed %s (left by an interrupted checkpoint write)", leftover)

        # loader, method, optimiser, step (DDP-wrapped under several processes)
        self.run = run = build_run(cfg, device, self.world, self.rank)
        self.cfg, self.device, self.knn_data = run.cfg, run.device, run.knn_data
        self.loader, self.method, self.model = run.loader, run.method, run.model
        self.optimizer, self.step_fn = run.optimizer, run.step
        self.steps_per_epoch, self.total_steps, self.warmup_steps = (run.steps_per_epoch, run.total_steps,
                                                                     run.warmup_steps)
        self.global_batch, self.lr_factor = run.global_batch, run.lr_factor

        self.runlog = RunLog(self.run_dir, t.tensorboard, enabled=self.is_main)
        self.health = Health(self.method, self.step_fn.guard, self.runlog, t, world=self.world,
                             is_main=self.is_main, note=self._last_checkpoint_note)
        self.pos = Position()
        self.last_loss = float("nan")  # at the last log step with a finite loss
        self.images = 0  # trained this fit()
        self._save_attempted_at: int | None = None  # one checkpoint attempt per step
        self.rollbacks, self.lr_scale = 0, 1.0  # rollbacks lower the learning rate by lr_scale
        self._blowup_steps = frozenset(t.debug_blowup_steps)  # testing only
        self._loader_closed = False

    def close(self, barrier: bool = False) -> None:
        """Release the loader's workers, and end the process group if this trainer created it (from
        the launcher's environment); with ``barrier`` (a clean end) after every rank got here. A
        second call does nothing more. (The PIL loader's workers are persistent: left open they hold
        their memory until the process ends, one set per Trainer in a process that trains several.)"""
        if not self._loader_closed:
            self._loader_closed = True
            self.loader.close()
        if self.owns_process_group:
            destroy(barrier)
            self.owns_process_group = False

    def lr_at(self, step: int) -> float:
        """The learning rate of iteration ``step`` (schedule x optim.lr_scaling x rollbacks' factor)."""
        return self.run.lr_at(step, self.lr_scale)

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return self.pos.step >= self.total_steps or bool(max_steps and self.pos.step >= max_steps)

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the end (or ``train.max_steps``, or a SIGTERM/SIGINT: checkpoint and return)."""
        cfg = self.cfg
        self._claim_run_dir()
        try:
            if self.is_main:
                save_config(cfg, self.run_dir / "config.yaml")
        except OSError as exc:
            raise DataError(f"cannot write {self.run_dir / 'config.yaml'}: {exc.strerror or exc}") from exc
        start_time, start_step, self.images = time.perf_counter(), self.pos.step, 0
        self._fit_start = (start_time, start_step)  # for the progress bar's ETA
        if self.is_main:
            log.info("run:\n  %s", "\n  ".join(describe_run(self)))
        self.runlog.write("start", step=self.pos.step, epoch=self.pos.epoch,
                          resumed=self._continuing and self.pos.step > 0)
        try:
            self.health.trusted(self.pos.step, self.model.parameters())  # trusted start
            with StopSignals() as signals:
                stop = StopAgreement(signals)  # all ranks stop at the same step
                while True:
                    try:
                        while not self._done() and not stop.agree():  # also agreed between epochs
                            self._run_epoch(stop)
                        if not self.checkpoints.exists(self.pos.step):
                            self.save_checkpoint()
                        break
                    except DivergenceDetected as exc:  # every rank sees it at the same step
                        self.handle_divergence(exc)  # stops (TrainingDiverged) or rolls back
            seconds = time.perf_counter() - start_time
            # a checkpoint at an epoch's last step holds that epoch as unfinished (batch_in_epoch full)
            epochs = self.pos.epoch + int(self.pos.batch_in_epoch >= self.steps_per_epoch)
            result = TrainResult(str(self.run_dir), self.pos.step, epochs, seconds,
                                 self.images / max(seconds, 1e-9) if self.pos.step > start_step else 0.0,
                                 self.last_loss, distinct_bad_files(self.loader),
                                 self.step_fn.guard.counts().total,
                                 stop.signum, is_main=self.is_main)
            if stop.requested:
                log.warning("stopped by %s at step %d; continue with --resume auto", stop.name, self.pos.step)
                self.runlog.write("preempted", step=self.pos.step, epoch=self.pos.epoch, signal=stop.name)
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
        epoch_start_step = self.pos.step
        self.method.on_epoch_start(self.pos.epoch)
        self.loader.set_epoch(self.pos.epoch, start_batch=self.pos.batch_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.pos.batch_in_epoch,
                   disable=not (t.progress and self.is_main), dynamic_ncols=True, leave=False,
                   desc=progress_desc(self.pos.epoch, cfg.optim.epochs))
        tick, tick_images = time.perf_counter(), 0
        wait, fetch_start = 0.0, tick  # time spent waiting for the loader since the last log step
        for data in until_stopped(self.loader, stop):
            wait += time.perf_counter() - fetch_start
            lr = self.lr_at(self.pos.step)
            if self._blowup_steps:
                faults.blow_up_weights(list(self.model.parameters()), self.pos.step, self._blowup_steps)
            loss = self.step_fn(data.views, lr, self.pos.step, data.indices)
            self.pos.step += 1
            self.pos.batch_in_epoch += 1
            self.images += batch
            tick_images += batch
            bar.update(1)
            if self.pos.step % t.log_every == 0 or self.pos.batch_in_epoch == self.steps_per_epoch:
                loss_value = float(all_reduce_mean(loss))  # mean over ranks; syncs the device
                now = time.perf_counter()
                ips = tick_images / max(now - tick, 1e-9)
                wait_fraction = min(1.0, wait / max(now - tick, 1e-9))
                tick, tick_images, wait = now, 0, 0.0
                self._log_step(loss_value, lr, ips, wait_fraction, bar)
            if t.checkpoint_every_steps and self.pos.step % t.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self._done() or stop.requested:
                break
            fetch_start = time.perf_counter()
        bar.close()
        if self.pos.batch_in_epoch >= self.steps_per_epoch:
            self.runlog.write("epoch", step=self.pos.step, epoch=self.pos.epoch, loss=self.last_loss,
                              steps=self.pos.step - epoch_start_step, bad_images=self.loader.num_bad)
            log.info("epoch %d done: step %d, loss %.4f, unreadable images so far %d", self.pos.epoch,
                     self.pos.step, self.last_loss, distinct_bad_files(self.loader))
            self.pos.epoch += 1
            self.pos.batch_in_epoch = 0
            every = cfg.eval.knn_every_epochs
            if self.is_main and self.knn_data is not None and knn_due(self.pos.epoch, every):
                out = periodic_knn(self.model.trunk, self.knn_data, cfg.eval, self.device)
                self.runlog.write("knn", step=self.pos.step, epoch=self.pos.epoch, periodic=True, **out)
                log.info("kNN top-1 after epoch %d: %.2f%%", self.pos.epoch, out["top1"])
            if t.checkpoint_every_epochs and self.pos.epoch % t.checkpoint_every_epochs == 0:
                self.save_checkpoint()

    def _log_step(self, loss: float, lr: float, images_per_s: float, loader_wait: float, bar: tqdm) -> None:
        """A log step (the loss is already on the host): divergence and NaN streaks, the record, then
        the method's health (e.g. SwAV's collapse)."""
        self.check_divergence(loss)
        counts = self.check_nonfinite()
        finite = math.isfinite(loss)
        if finite:
            self.last_loss = loss
        start_time, start_step = getattr(self, "_fit_start", (time.perf_counter(), self.pos.step))
        end = min(self.total_steps, self.cfg.train.max_steps or self.total_steps)
        eta = eta_text(self.pos.step - start_step, time.perf_counter() - start_time, end - self.pos.step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s:.1f}", eta=eta)
        self.runlog.write("step", step=self.pos.step, epoch=self.pos.epoch, loss=loss if finite else None,
                          lr=lr, images_per_s=round(images_per_s, 2),
                          loader_wait_fraction=round(loader_wait, 4), bad_images=self.loader.num_bad,
                          nonfinite_steps=counts.total)
        self.health.check_method(self.pos.step, loss)

    def evaluate_knn(self) -> dict[str, Any]:
        """kNN top-1 of the trained trunk and of the same trunk at its random initialisation."""
        e = self.cfg.eval
        kw = dict(image_size=e.image_size, k=e.knn_k, temperature=e.knn_temperature,
                  batch_size=e.batch_size, device=self.device)
        trained = knn_eval(self.model.trunk, self.knn_data, **kw)
        torch.manual_seed(self.cfg.train.seed)
        # in the trained trunk's layout (the same arithmetic)
        initial = place(build_model(self.cfg), self.device, self.run.channels_last)
        random_init = knn_eval(initial.trunk, self.knn_data, **kw)
        out = {"trained_top1": trained.top1, "random_init_top1": random_init.top1, **{
            k: v for k, v in trained.as_dict().items() if k != "top1"}}
        self.runlog.write("knn", step=self.pos.step, **out)
        return out

    # -- health ----------------------------------------------------------------------------------------
    def check_divergence(self, loss: float | None) -> None:
        """:class:`DivergenceDetected` when the loss (if given) or the weight norm has run away."""
        self.health.check_divergence(self.pos.step, loss, self.model.parameters())

    def check_nonfinite(self) -> NonFiniteCounts:
        """Report newly skipped NaN/inf steps; TrainingDiverged after too many in a row."""
        return self.health.check_nonfinite(self.pos.step)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's state; a collective under ``torch.distributed`` (per-rank state is gathered)."""
        return self.checkpoints.state(self.run, self.pos, {"rollbacks": self.rollbacks,
                                                           "lr_scale": self.lr_scale})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint; from another world size the per-rank state (queue) is reset and the
        position in the epoch is converted (same samples seen), with a warning."""
        self.pos = self.checkpoints.load(self.run, state)
        self.rollbacks, self.lr_scale = int(state.get("rollbacks", 0)), float(state.get("lr_scale", 1.0))
        self.health.loaded()

    def resume(self, how: str) -> bool:
        """``auto``: newest loadable checkpoint of the run folder (none: start fresh); else a path.
        Under ``torch.distributed`` rank 0 chooses and every rank loads that file."""
        self._continuing = True  # the run folder's files are this run's own
        found = self.checkpoints.find(how)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
            return False
        path, state = found
        step_before = state["step"]
        self.load_state_dict(state)
        if self.pos.step < step_before:  # renumbered down (another global batch): newer ones would shadow
            world = int(state.get("world_size", 1))
            self.checkpoints.set_aside_above(self.pos.step, f"before-resize-world{world}")
        log.info("resumed from %s (epoch %d, step %d)", path, self.pos.epoch, self.pos.step)
        self.runlog.write("resume", step=self.pos.step, epoch=self.pos.epoch, path=str(path))
        return True

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current state (refused once the run has diverged); on a write failure the
        previous checkpoint stays and ``train.on_checkpoint_error`` says whether to stop."""
        self.check_divergence(None)
        self.check_nonfinite()
        path = self.checkpoints.path(self.pos.step)
        if self._save_attempted_at == self.pos.step:  # e.g. a step that is also an epoch end
            return path if path.exists() else None
        self._save_attempted_at = self.pos.step
        state = self.state_dict()  # every rank (gathers the per-rank state); rank 0 writes
        try:
            self.checkpoints.save(state, self.pos.step)
        except CheckpointError as exc:
            self._checkpoint_failed(path, exc)
            return None
        self.runlog.write("checkpoint", step=self.pos.step, epoch=self.pos.epoch, path=str(path))
        return path

    def _checkpoint_failed(self, path: Path, exc: CheckpointError) -> None:
        policy, kept = self.cfg.train.on_checkpoint_error, self._last_checkpoint_note()
        self.runlog.write("checkpoint_error", step=self.pos.step, epoch=self.pos.epoch, path=str(path),
                          error=str(exc), policy=policy)
        if policy == "stop":
            raise CheckpointError(f"{exc}; {kept}. Stopping (train.on_checkpoint_error=stop): free space or "
                                  "fix the folder, then continue with --resume auto") from exc
        log.error("%s; %s; training continues (train.on_checkpoint_error=continue)", exc, kept)

    def _healthy_checkpoint(self) -> Path | None:
        """The newest checkpoint written no later than the last passed divergence check."""
        return self.checkpoints.healthy(self.health.healthy_step)

    def _last_checkpoint_note(self) -> str:
        healthy = self._healthy_checkpoint()
        if healthy is not None:
            return f"the last checkpoint {healthy} is intact (it passed the divergence checks)"
        return "no checkpoint that passed the health checks was written"

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

    # -- divergence ------------------------------------------------------------------------------------
    def _divergence_stop(self, exc: DivergenceDetected, why: str) -> TrainingDiverged:
        msg = (f"training diverged at step {exc.step}: {exc.reason}; {why}; {self._last_checkpoint_note()}. "
               "Try a lower optim.base_lr or a longer warmup, or train.on_divergence=rollback")
        self.runlog.write("diverged", step=exc.step, reason="divergence", message=msg,
                          healthy_checkpoint=str(self._healthy_checkpoint() or "") or None)
        return TrainingDiverged(msg)

    def handle_divergence(self, exc: DivergenceDetected) -> None:
        """``train.on_divergence``: stop (TrainingDiverged naming the healthy checkpoint), or roll back to
        the newest checkpoint from before the divergence, skip the batches up to ``exc.step`` and
        multiply the learning rate by ``train.rollback_lr_factor``."""
        t = self.cfg.train
        # checkpoints written after the last passed check must not be picked by --resume auto
        self.checkpoints.set_aside_above(self.health.healthy_step, f"diverged-step{exc.step}")
        healthy = broadcast_object(str(self._healthy_checkpoint() or "") if self.is_main else None)
        if t.on_divergence != "rollback":
            raise self._divergence_stop(exc, "train.on_divergence=stop")
        if self.rollbacks >= t.max_rollbacks:
            raise self._divergence_stop(exc, f"{self.rollbacks} rollback(s) already (train.max_rollbacks)")
        if not healthy:
            raise self._divergence_stop(exc, "nothing to roll back to")
        rollbacks, lr_scale = self.rollbacks + 1, self.lr_scale * t.rollback_lr_factor
        self.load_state_dict(self.checkpoints.load_file(healthy))
        restored = self.pos.step
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        # skip the batches that led to the divergence: the data position jumps to where it was detected
        step = min(exc.step, self.total_steps)
        self.pos = Position(step // self.steps_per_epoch, step, step % self.steps_per_epoch)
        self._save_attempted_at = None
        self.health.trusted(self.pos.step, self.model.parameters())
        log.warning("step %d: %s; rolled back to %s (step %d), skipping the batches of steps %d-%d, "
                    "learning rate x %.4g (rollback %d of at most %d)", exc.step, exc.reason, healthy,
                    restored, restored + 1, exc.step, self.lr_scale, self.rollbacks, t.max_rollbacks)
        self.runlog.write("rollback", step=self.pos.step, detected_at=exc.step, reason=exc.reason,
                          checkpoint=healthy, restored_step=restored, skipped_steps=[restored + 1, exc.step],
                          lr_scale=self.lr_scale, rollbacks=self.rollbacks)


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
