"""Training health: non-finite steps undone on the device, divergence; :class:`Health` runs every check.

:class:`NonFiniteGuard` makes a step whose loss (or gradient) is NaN/inf a no-op without a host
synchronisation: the step runs, then every tensor it may have changed (parameters, buffers such as
batch-norm statistics and the queue, optimiser state) is put back with ``torch.where`` on a device
flag. Counters stay on the device; the trainer reads them only where it syncs anyway (log steps,
checkpoints).

A method's own signs of failure (SwAV's collapsed codes) are the method's: :meth:`Method.health
<swav_fast.methods.base.Method.health>` (e.g. :func:`swav_fast.methods.swav.collapse_signs`).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from swav_fast.errors import TrainingDiverged

log = logging.getLogger("swav_fast")

def state_tensors(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step may change: parameters, buffers, optimiser state."""
    out: list[torch.Tensor] = []
    for m in modules:
        out += list(m.parameters())  # the objects themselves: identity is stable between calls
        out += list(m.buffers())
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def is_finite(loss: torch.Tensor, grads: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """0-d bool tensor on the loss's device: the loss and (optionally) all gradients are finite."""
    finite = torch.isfinite(loss.detach()).all()
    if grads:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(list(grads))).sum())
    return finite


@dataclass
class NonFiniteCounts:
    """Host copy of the guard's counters."""
    total: int  # non-finite steps so far (each skipped)
    streak: int  # current run of consecutive non-finite steps
    worst_streak: int  # longest such run so far


class NonFiniteGuard:
    """Snapshot before a step, keep or restore after it; count non-finite steps on the device.

    Multi-tensor throughout, so the guard costs a few kernels per step whatever the number of
    tensors: the snapshot lives in one flat buffer per (device, dtype), written by one
    ``torch._foreach_copy_`` into views that have each tensor's own strides; the restore is one
    ``cat`` of the tensors (in memory order), one ``torch.where`` against the flat snapshot and one
    ``torch._foreach_copy_`` back. The buffers are reused from step to step (allocated again only
    when the set of tensors changes, e.g. when the optimiser creates its momentum), so the guard
    adds no host synchronisation and can sit inside a CUDA graph.
    """

    def __init__(self, device: torch.device):
        self._counts = torch.zeros(3, dtype=torch.long, device=device)  # total, streak, worst streak
        self._snapshot: list[torch.Tensor] = []  # per tensor: a view of a flat buffer (or its own copy)
        self._snapshot_of: list[torch.Tensor] = []  # the tensors the snapshot buffers were made for
        self._layout: list[tuple] = []  # (shape, stride, dtype, device) of those tensors
        self._flat: list[_FlatGroup] = []
        self._before: list[torch.Tensor] = []

    @torch.no_grad()
    def begin(self, tensors: list[torch.Tensor]) -> None:
        """Remember the values of ``tensors`` (copied into reused buffers)."""
        if not _same_objects(tensors, self._snapshot_of):
            layout = [(t.shape, t.stride(), t.dtype, t.device) for t in tensors]
            if layout != self._layout:
                self._snapshot, self._flat = _snapshot_buffers(tensors)
                self._layout = layout
            self._snapshot_of = list(tensors)
        if tensors:
            torch._foreach_copy_(self._snapshot, tensors)
        self._before = tensors

    @torch.no_grad()
    def end(self, finite: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Keep the step's values where ``finite``, else restore the snapshot.

        Tensors created during the step (e.g. a first momentum buffer) are zeroed instead, which for
        SGD and LARS is the same as not existing yet.
        """
        if _same_objects(tensors, self._before):
            for group in self._flat:
                group.restore_unless(finite, [tensors[i] for i in group.index])
            loose = [(tensors[i], self._snapshot[i]) for i in _loose(self._flat, len(tensors))]
        else:  # the set of tensors changed during the step: the rare per-tensor path
            index = {id(t): i for i, t in enumerate(self._before)}
            loose = [(t, self._snapshot[index[id(t)]] if id(t) in index else None) for t in tensors]
        for t, old in loose:
            if old is None:
                old = torch.zeros((), dtype=t.dtype, device=t.device)
            torch.where(finite, t, old, out=t)
        self._before = []
        bad = (~finite).long()
        total, streak, worst = self._counts.unbind()
        streak = (streak + bad) * bad
        self._counts.copy_(torch.stack([total + bad, streak, torch.maximum(worst, streak)]))

    def counts(self) -> NonFiniteCounts:
        """Read the counters (a host synchronisation: call at log steps and checkpoints only)."""
        total, streak, worst = (int(v) for v in self._counts.tolist())
        return NonFiniteCounts(total, streak, worst)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self._counts.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._counts.copy_(state["counts"])


class _FlatGroup:
    """The snapshot of the dense tensors of one (device, dtype): one flat buffer in their memory order."""

    def __init__(self, index: list[int], flat: torch.Tensor, numels: list[int]):
        self.index, self.flat, self.numels = index, flat, numels

    def restore_unless(self, finite: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """``t <- where(finite, t, snapshot)`` for all of them in three kernels."""
        flat_views = [_memory_order(t) for t in tensors]
        now = torch.cat(flat_views)
        torch.where(finite, now, self.flat, out=now)
        torch._foreach_copy_(flat_views, list(now.split(self.numels)))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous in some dimension order: channels-last included)."""
    if t.numel() == 0:
        return False
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-d view in memory order (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def _snapshot_buffers(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[_FlatGroup]]:
    """Per tensor a buffer with its shape and strides: views of one flat buffer per (device, dtype) for
    dense tensors, a copy of its own otherwise."""
    snapshot: list[torch.Tensor | None] = [None] * len(tensors)
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if _dense(t):
            by_kind.setdefault((t.device, t.dtype), []).append(i)
        else:
            snapshot[i] = torch.empty_like(t)
    groups = []
    for (device, dtype), index in by_kind.items():
        numels = [tensors[i].numel() for i in index]
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
        offset = 0
        for i, n in zip(index, numels):
            t = tensors[i]
            # the view's memory order is the tensor's (dense strides): flat[offset:offset+n] holds t
            snapshot[i] = flat.as_strided(t.shape, t.stride(), offset)
            offset += n
        groups.append(_FlatGroup(index, flat, numels))
    return snapshot, groups  # type: ignore[return-value]


def _loose(groups: list[_FlatGroup], n: int) -> list[int]:
    """Indices of the tensors that no flat group holds (not dense)."""
    held = {i for g in groups for i in g.index}
    return [i for i in range(n) if i not in held]


def _same_objects(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """The same tensor objects in the same order (identity, not values)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# divergence


class DivergenceDetected(Exception):
    """Raised inside the training loop when :class:`DivergenceMonitor` trips (handled by the trainer)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"step {step}: {reason}")
        self.step = step
        self.reason = reason


@torch.no_grad()
def weight_norm(params: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all ``params`` together (a host synchronisation: log steps and checkpoints only)."""
    tensors = [p.detach() for p in params if p.is_floating_point()]
    if not tensors:
        return 0.0
    norms = torch.stack([n.double() for n in torch._foreach_norm(tensors)])
    return float(torch.linalg.vector_norm(norms))


class DivergenceMonitor:
    """Finite but runaway training: a loss far above its running mean, or a weight norm far above its
    recent range (a step with a huge learning rate can wreck the weights and still give a finite loss).

    Fed at log steps (where the loss is on the host anyway) and before checkpoints, so it adds no host
    synchronisation per step. ``healthy_step`` is the step of the last check that passed: state from
    then (and checkpoints written up to then) predates the divergence.
    """

    def __init__(self, loss_factor: float = 10.0, norm_factor: float = 10.0, window: int = 20,
                 min_losses: int = 5):
        self.loss_factor, self.norm_factor = loss_factor, norm_factor
        self.min_losses = min_losses
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.healthy_step = 0

    def reset(self, step: int, norm: float) -> None:
        """Start over from trusted weights (a fresh start, a resume or a rollback) of norm ``norm``."""
        self.losses.clear()
        self.norms.clear()
        if math.isfinite(norm):
            self.norms.append(norm)
        self.healthy_step = step

    def check(self, step: int, loss: float | None, norm: float) -> str | None:
        """The reason when this looks diverged (the history is then left as it was), else None."""
        reason = None
        if not math.isfinite(norm):
            reason = f"the weight norm is {norm}"
        elif self.norm_factor and self.norms and norm > self.norm_factor * max(self.norms):
            reason = (f"the weight norm {norm:.4g} is more than {self.norm_factor:g}x its recent maximum "
                      f"{max(self.norms):.4g}")
        elif (loss is not None and math.isfinite(loss) and self.loss_factor
              and len(self.losses) >= self.min_losses):
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.losses) / len(self.losses))
            limit = mean + self.loss_factor * max(abs(mean), std, 1e-12)
            if loss > limit:
                reason = (f"the loss {loss:.4g} is far above its running mean {mean:.4g} (limit {limit:.4g}: "
                          f"mean + {self.loss_factor:g} x max(|mean|, std))")
        if reason is not None:
            return reason
        self.norms.append(norm)
        if loss is not None and math.isfinite(loss):
            self.losses.append(loss)
        self.healthy_step = step
        return None


# ----------------------------------------------------------------------------------------------
# one health checker for the run


class Health:
    """A run's health checks in one object: non-finite steps, divergence, and the method's own signs of
    failure (:meth:`swav_fast.methods.base.Method.health`, e.g. SwAV's collapse).

    Called where the loop syncs with the device anyway (log steps and checkpoints):

    - :meth:`check_nonfinite`: reports the steps the guard skipped since the last check; more than
      ``train.max_nonfinite_steps`` in a row stop the run (:class:`TrainingDiverged`);
    - :meth:`check_divergence`: :class:`DivergenceDetected` when the loss or the weight norm ran away
      (the loop stops or rolls back, ``train.on_divergence``);
    - :meth:`check_method`: a failed report is written to metrics.jsonl under its ``kind`` with its
      signals, its message is logged on the first failed check of a streak, and
      ``train.collapse_patience`` consecutive failed checks stop the run. Under several processes rank 0
      checks and its verdict is shared.

    ``note()`` says which checkpoint is intact (for the messages)."""

    def __init__(self, method: Any, guard: NonFiniteGuard, runlog: Any, train_cfg: Any, *, world: int = 1,
                 is_main: bool = True, note: Callable[[], str] = lambda: ""):
        t = train_cfg
        self.method, self.guard, self.runlog = method, guard, runlog
        self.world, self.is_main, self.note = world, is_main, note
        self.max_nonfinite = t.max_nonfinite_steps
        self.patience = t.collapse_patience  # 0: report only
        self.divergence = DivergenceMonitor(t.divergence_loss_factor, t.divergence_norm_factor)
        self.streak = 0  # consecutive failed method checks
        self.nonfinite_reported = 0

    # -- non-finite steps ----------------------------------------------------------------------------
    def loaded(self) -> None:
        """After a checkpoint load: its skipped steps were reported by the run that wrote it."""
        self.nonfinite_reported = self.guard.counts().total

    def check_nonfinite(self, step: int) -> NonFiniteCounts:
        """Report newly skipped NaN/inf steps; TrainingDiverged after too many in a row."""
        counts = self.guard.counts()
        new = counts.total - self.nonfinite_reported
        if new > 0:
            log.warning("step %d: %d NaN/inf step(s) skipped since the last check (%d in all)", step, new,
                        counts.total)
            self.runlog.write("nonfinite", step=step, skipped=new, total=counts.total, streak=counts.streak)
            self.nonfinite_reported = counts.total
        if self.max_nonfinite and counts.worst_streak >= self.max_nonfinite:
            msg = (f"the loss was NaN/inf for {counts.worst_streak} consecutive steps by step {step} "
                   f"(train.max_nonfinite_steps={self.max_nonfinite}); those steps were skipped and "
                   f"{self.note()}. Try a lower optim.base_lr or a longer warmup, "
                   "train.precision=bf16 or fp32 instead of fp16, or check the data")
            self.runlog.write("diverged", step=step, reason="nonfinite", message=msg)
            raise TrainingDiverged(msg)
        return counts

    # -- divergence ----------------------------------------------------------------------------------
    def trusted(self, step: int, params: Iterable[torch.Tensor]) -> None:
        """The weights are trusted from ``step`` (a fresh start, a resume, a rollback)."""
        self.divergence.reset(step, weight_norm(params))

    @property
    def healthy_step(self) -> int:
        """The step of the last passed divergence check."""
        return self.divergence.healthy_step

    def check_divergence(self, step: int, loss: float | None, params: Iterable[torch.Tensor]) -> None:
        """Raise :class:`DivergenceDetected` when the loss (if given) or the weight norm has run away."""
        reason = self.divergence.check(step, loss, weight_norm(params))
        if reason is not None:
            raise DivergenceDetected(step, reason)

    # -- the method's own signs ------------------------------------------------------------------------
    def check_method(self, step: int, loss: float) -> None:
        """The method's health report at a log step (rank 0 under several processes)."""
        if self.world == 1:
            self._check_method(step, loss)
            return
        if not (self.is_main or self.patience):
            return
        verdict = None
        if self.is_main:
            try:
                self._check_method(step, loss)
            except TrainingDiverged as exc:
                verdict = str(exc)
        if self.patience:  # every rank stops at the same step
            from swav_fast.distributed import broadcast_object

            verdict = broadcast_object(verdict)
        if verdict is not None:
            raise TrainingDiverged(verdict)

    def _check_method(self, step: int, loss: float) -> None:
        report = self.method.health(step, loss)
        if report is None:
            return
        self.streak = 0 if report.ok else self.streak + 1
        if report.ok:
            return
        self.runlog.write(report.kind, step=step, **report.signals)
        if self.streak == 1:
            log.warning("step %d: %s", step, report.message)
        if self.patience and self.streak >= self.patience:
            msg = (f"stopped at step {step} after {self.streak} consecutive {report.kind} checks "
                   f"(train.collapse_patience={self.patience}); {self.note()}. {report.message}")
            self.runlog.write("diverged", step=step, reason=report.kind, message=msg)
            raise TrainingDiverged(msg)

