"""A run's checkpoints: what is saved, where the run resumes, and how another world size is met.

:class:`Position` is where the run stands (epoch, batch in that epoch, global step); :class:`Checkpointer`
writes the run's state (atomically, with a checksum, keeping the newest ``train.keep_checkpoints``),
finds the newest loadable or healthy checkpoint, and loads one into a :class:`~swav_fast.run.Run`,
converting from the world size (global batch) that wrote it:

- the position keeps the samples already seen in the epoch: ``batch = floor(batch_saved x B_saved / B)``,
  ``step = epoch x steps_per_epoch + batch``;
- per-rank objective state (a feature queue) is this rank's saved copy at the same world size, and is
  reset at another (it refills before it is used again); everything else is restored as saved.

The low-level file operations (atomic write, digests, listing, pruning) are :mod:`swav_fast.checkpoint`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from swav_fast import checkpoint as ckpt
from swav_fast import ddp
from swav_fast.distributed import broadcast_object
from swav_fast.errors import CheckpointError

log = logging.getLogger("swav_fast")

#: the format tag of the state dict (checkpoints without it predate it and load the same)
FORMAT = "swav-fast/1"


@dataclass
class Position:
    """Where a run stands: ``step`` iterations done in all, ``batch_in_epoch`` of them in ``epoch``."""
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0

    def converted(self, saved_global: int, global_batch: int, steps_per_epoch: int) -> "Position":
        """The same place in the data for another global batch: the samples already seen in this epoch
        (``batch_in_epoch x saved_global``) stay seen, and ``step`` is where this run's schedule has that
        epoch position."""
        batch = min(self.batch_in_epoch * saved_global // global_batch, steps_per_epoch)
        return Position(self.epoch, self.epoch * steps_per_epoch + batch, batch)


class Checkpointer:
    """Save / find / load the checkpoints of the run folder ``run_dir`` (``checkpoints/ckpt-N.pt``).

    Under ``torch.distributed``, :meth:`state` and :meth:`save` are collectives (every rank calls them):
    the per-rank state is gathered, rank 0 (``is_main``) writes and the others follow its outcome."""

    def __init__(self, run_dir: str | Path, keep: int = 0, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.keep = keep  # newest checkpoints kept (0: all)
        self.is_main = is_main

    # -- where ---------------------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        return ckpt.checkpoint_path(self.run_dir, step)

    def exists(self, step: int) -> bool:
        """Whether step ``step``'s checkpoint exists (rank 0's answer, on every rank)."""
        return bool(broadcast_object(self.path(step).exists() if self.is_main else None))

    def remove_leftovers(self) -> list[Path]:
        """Temp files and orphan sidecars an interrupted write left behind (removed)."""
        return ckpt.remove_leftovers(self.run_dir)

    def healthy(self, healthy_step: int) -> Path | None:
        """The newest checkpoint written no later than ``healthy_step`` (the last passed health check)."""
        ok = [p for p in ckpt.list_checkpoints(self.run_dir) if ckpt.checkpoint_step(p) <= healthy_step]
        return ok[-1] if ok else None

    def set_aside_above(self, step: int, folder: str) -> int:
        """Move the checkpoints numbered above ``step`` to ``checkpoints/<folder>/`` (out of reach of
        ``--resume auto`` and pruning; kept for a post-mortem); how many moved."""
        if not self.is_main:
            return 0
        moved, aside = ckpt.move_checkpoints_above(self.run_dir, step, folder)
        if moved:
            log.warning("moved %d checkpoint(s) numbered above step %d to %s", moved, step, aside)
        return moved

    # -- what ----------------------------------------------------------------------------------------
    def state(self, run: Any, pos: Position, extra: dict[str, Any]) -> dict[str, Any]:
        """The state of ``run`` at ``pos`` (``extra``: the loop's own entries, e.g. rollbacks); a
        collective under ``torch.distributed`` (every rank's per-rank state is gathered)."""
        objective = run.method.extra_state_dict()
        _, own = ddp.split_per_rank(objective, ddp.per_rank_prefixes(run.method))
        return {
            "format": FORMAT,
            "model": run.model.state_dict(),
            "objective": objective,
            "objective_ranks": ddp.gather_per_rank(own),  # e.g. every rank's feature queue
            "world_size": run.world, "global_batch": run.global_batch,
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.step.scaler.state_dict(),
            "epoch": pos.epoch, "step": pos.step, "batch_in_epoch": pos.batch_in_epoch,
            "rng": ckpt.rng_state(),
            "nonfinite": run.step.guard.state_dict(),
            **extra,
            "config": run.cfg.to_dict(),
        }

    def load(self, run: Any, state: dict[str, Any]) -> Position:
        """Load ``state`` into ``run`` (model, objective, optimiser, scaler, non-finite counters, RNG);
        the position, converted to this run's global batch. CheckpointError when it does not fit."""
        saved_world = int(state.get("world_size", 1))
        try:
            run.model.load_state_dict(state["model"])
            run.method.load_extra_state_dict(self.objective_state(run, state))
            run.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                run.step.scaler.load_state_dict(state["scaler"])
            if "nonfinite" in state:
                run.step.guard.load_state_dict(state["nonfinite"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not match this config/model: "
                                  f"{str(exc).splitlines()[0]}") from exc
        ckpt.set_rng_state(state["rng"])
        pos = Position(state["epoch"], state["step"], state["batch_in_epoch"])
        saved_global = int(state.get("global_batch") or state["config"]["optim"]["batch_size"] * saved_world)
        if saved_global == run.global_batch:
            return pos
        new = pos.converted(saved_global, run.global_batch, run.steps_per_epoch)
        log.warning("the checkpoint's global batch was %d, this run's is %d: step %d (batch %d of epoch %d) "
                    "becomes step %d (batch %d); the learning-rate schedule and prototype freezing count "
                    "this run's steps", saved_global, run.global_batch, pos.step, pos.batch_in_epoch,
                    pos.epoch, new.step, new.batch_in_epoch)
        return new

    @staticmethod
    def objective_state(run: Any, state: dict[str, Any]) -> dict[str, Any]:
        """The method's extra state to load: shared entries from the checkpoint, per-rank ones from
        this rank's saved copy (same world size) or freshly reset (another world size)."""
        saved_world = int(state.get("world_size", 1))
        prefixes = ddp.per_rank_prefixes(run.method)
        shared, own = ddp.split_per_rank(state["objective"], prefixes)
        if not prefixes:
            return shared
        if saved_world == run.world:
            ranks = state.get("objective_ranks")
            return {**shared, **(ranks[run.rank] if ranks else own)}
        ddp.reset_per_rank(run.method)
        log.warning("the checkpoint was written by %d process(es), this run has %d: the per-rank state %s "
                    "is reset (a feature queue refills before it is used again); everything else is restored",
                    saved_world, run.world, ", ".join(p.rstrip(".") for p in prefixes))
        _, fresh = ddp.split_per_rank(run.method.extra_state_dict(), prefixes)
        return {**shared, **fresh}

    # -- files ---------------------------------------------------------------------------------------
    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as step ``step``'s checkpoint (rank 0; the others follow its outcome) and
        prune to the newest ``keep``. CheckpointError (on every rank) when the write failed: the
        previous checkpoints are then untouched."""
        path = self.path(step)
        error = None
        if self.is_main:
            try:
                ckpt.atomic_save(state, path, checksum=True)
            except CheckpointError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)
        if self.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.keep)
        return path

    def find(self, how: str, warn: Callable[[str], None] = log.warning) -> tuple[Path, dict[str, Any]] | None:
        """``auto``: the newest loadable checkpoint of the run folder (rank 0 chooses, every rank loads
        that file; None when there is none); else the checkpoint file ``how``."""
        if how != "auto":
            return Path(how), ckpt.load_checkpoint(how)
        found = ckpt.latest_valid_checkpoint(self.run_dir, log=warn) if self.is_main else None
        chosen = broadcast_object(str(found[0]) if found else None)
        if chosen is None:
            return None
        return found if found else (Path(chosen), ckpt.load_checkpoint(chosen))

    @staticmethod
    def load_file(path: str | Path) -> dict[str, Any]:
        """A checkpoint's state (digests checked, ``torch.load(weights_only=True)``)."""
        return ckpt.load_checkpoint(path)
