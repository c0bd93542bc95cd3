"""Sync audit: steady-state training iterations must not synchronise the host with the GPU.

:func:`audit_syncs` runs ``warmup`` iterations normally (compilation, capture, cuDNN autotuning and
the loader's first batches may synchronise), then ``steps`` iterations under
``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call in any thread (the step, the
loader's worker threads) raises there, and the audit reports where. The mode is process-wide, so the
loader's threads are audited too; a sync in a loader thread reaches the audit through the loader,
which re-raises its workers' errors in the consumer.

Off CUDA the iterations still run (so a CPU dry run exercises the same code) and the result says
"not applicable". :func:`host_reads` is the CPU stand-in for eager code: it records the ATen ops that
read a tensor's value on the host (``.item()``, ``bool(t)``, ``nonzero``, ``masked_select``), which
synchronise on a GPU.

Used by ``tests/test_sync_audit.py`` and by ``swav-fast bench all``.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

#: The message of the RuntimeError (and warning) of ``set_sync_debug_mode``.
SYNC_MESSAGE = "called a synchronizing CUDA operation"


@dataclass
class SyncAudit:
    """What :func:`audit_syncs` saw."""

    applicable: bool
    warmup: int  # iterations run before the audit
    steps: int  # iterations run under the audit (up to and including the one that synchronised)
    syncs: list[str] = field(default_factory=list)  # "where: message" of each synchronisation found
    reason: str | None = None  # why the audit does not apply here

    @property
    def ok(self) -> bool:
        """No synchronisation found (trivially true where the audit does not apply)."""
        return not self.syncs

    def summary(self) -> str:
        if not self.applicable:
            return f"sync audit not applicable ({self.reason}); ran {self.warmup + self.steps} iterations"
        if self.ok:
            return f"no host synchronisation in {self.steps} steady-state iterations"
        return f"host synchronisation in steady state: {'; '.join(self.syncs)}"

    def check(self) -> "SyncAudit":
        """Raise AssertionError with the summary where a synchronisation was found."""
        if not self.ok:
            raise AssertionError(self.summary())
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"applicable": self.applicable, "ok": self.ok, "warmup": self.warmup, "steps": self.steps,
                "syncs": list(self.syncs), "reason": self.reason}


def audit_syncs(iteration: Callable[[int], Any], steps: int = 5, warmup: int = 3,
                device: Any = None, set_mode: Callable[[Any], None] | None = None,
                get_mode: Callable[[], Any] | None = None) -> SyncAudit:
    """Run ``iteration(i)`` for ``i < warmup`` freely, then for ``warmup <= i < warmup + steps`` under
    sync-debug mode ``"error"``; the mode is restored afterwards, whatever happened.

    ``iteration``: one steady-state training iteration (next batch from the loader, one step), e.g.
    from :func:`loader_step_iteration`. ``device``: the training device (default: CUDA when available).
    ``set_mode`` / ``get_mode`` replace ``torch.cuda.set_sync_debug_mode`` / ``get_sync_debug_mode``
    (tests). The first synchronisation stops the audit (the iteration it interrupted is incomplete).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"audit_syncs needs steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    fake = set_mode is not None
    if not fake and (dev.type != "cuda" or not torch.cuda.is_available()):
        for i in range(warmup + steps):
            iteration(i)
        return SyncAudit(False, warmup, steps, reason=f"sync debug mode needs a CUDA device; the "
                                                       f"iterations ran on {dev.type}")
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    get_mode = get_mode or torch.cuda.get_sync_debug_mode
    for i in range(warmup):
        iteration(i)
    if not fake:
        torch.cuda.synchronize(dev)
    before = get_mode()
    result = SyncAudit(True, warmup, 0)
    set_mode("error")
    try:
        for i in range(warmup, warmup + steps):
            result.steps += 1
            iteration(i)
    except RuntimeError as exc:
        if SYNC_MESSAGE not in str(exc):
            raise
        result.syncs.append(f"{where(exc)}: {SYNC_MESSAGE}")
    finally:
        set_mode(before)
    if not fake:
        torch.cuda.synchronize(dev)
    return result


def where(exc: BaseException) -> str:
    """``file:line (function)`` of the project frame closest to where ``exc`` was raised (else the
    innermost frame), from its traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown place"
    ours = [f for f in frames if _ours(f.filename)]
    f = (ours or frames)[-1]
    short = "/".join(f.filename.split("/")[-2:])
    return f"{short}:{f.lineno} ({f.name})"


def _ours(filename: str) -> bool:
    """A frame of the project's code (not of this module)."""
    return ("/swav_fast/" in filename or "/pipelines/" in filename) and not filename.endswith("syncaudit.py")


def loader_step_iteration(step: Callable[..., Any], batches: Iterable[Any], lr: float = 0.05,
                          ) -> Callable[[int], Any]:
    """An ``iteration(i)`` for :func:`audit_syncs`: the next loader batch through ``step`` (a
    :class:`~swav_fast.step.TrainStep`: ``step(views, lr, i, indices)``); ``batches`` is iterated
    lazily, so the loader's own per-batch work is audited as well."""
    it: Iterator[Any] = iter(batches)

    def iteration(i: int) -> Any:
        batch = next(it)
        return step(batch.views, lr, i, batch.indices)

    return iteration


# -- the CPU stand-in for eager code --------------------------------------------------------------
def _host_read_ops() -> set[Any]:
    aten = torch.ops.aten
    return {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())


def host_reads(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn()`` (eager code) and list the ops that read tensor values on the host or have a
    value-dependent output size (each a synchronisation on a GPU), as ``op at file:line``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = _host_read_ops()
    aten = torch.ops.aten
    masked = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # x[mask]: a nonzero
    found: list[str] = []

    class _Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in ops or (func in masked and _bool_index(args)):
                stack = [f for f in traceback.extract_stack() if _ours(f.filename)]
                place = f"{'/'.join(stack[-1].filename.split('/')[-2:])}:{stack[-1].lineno}" if stack else "?"
                found.append(f"{func} at {place}")
            return func(*args, **(kwargs or {}))

    with _Probe():
        fn()
    return found
