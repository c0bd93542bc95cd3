"""One training step behind one call, whatever the execution mode.

``TrainStep(views, lr, iteration, indices)`` runs a :class:`~swav_fast.methods.Method`'s forward and
loss, backward, its hooks, the freeze of its frozen parameters (SwAV's prototypes) and the optimiser
update, and returns the detached loss. Three modes, the same maths:

``eager``
    Plain PyTorch; the method's eager loss functions, host-side decisions (frozen parameters get no
    gradient, the queue is used once the host sees it full). The reference.
``compile``
    ``torch.compile`` of forward + loss (SwAV: the fused Sinkhorn + swapped loss of
    :mod:`swav_fast.losses.fused`, float32 inside), then backward and the optimiser. Every decision
    is a device tensor: the learning rate and the iteration live in 0-d tensors, frozen parameters
    and their optimiser state are snapshotted and put back with ``torch.where(step < n, old, new)``,
    the queue is used and pushed under device flags. No host synchronisation in the step.
``graph``
    The ``compile`` step captured once as a CUDA graph (forward with the trunk once per resolution,
    loss, backward, LARS update, prototype re-normalisation, queue update, NaN guard) and replayed
    every iteration. Inputs are copied into static buffers (or written there by the loader, see
    :meth:`TrainStep.input_buffers` and :attr:`TrainStep.inputs_consumed`). Before the capture,
    ``graph_warmup`` steps run on a side stream (compilation, cuDNN autotuning, optimiser state),
    after which every state tensor is put back, so the warm-up changes nothing. Where capture is
    impossible (CPU, fp16 with its grad scaler, an optimiser without device-tensor learning rates,
    several processes, or a capture error) the ``compile`` step runs instead and one log line says
    why. Nothing triggers a re-capture during a run (prototype freeze, queue start and learning rate
    are device tensors); only replaced state tensors (a checkpoint loaded after the first step) do,
    with a warning.

A step whose loss (or, without a grad scaler, a gradient) is NaN/inf changes nothing: parameters,
batch-norm statistics, the queue and the optimiser state are restored on the device by
:class:`~swav_fast.guards.NonFiniteGuard`, with no host synchronisation; ``step.guard.counts()``
tells how many steps were skipped.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Sequence

import torch
import torch.nn as nn

from swav_fast import faults
from swav_fast.distributed import world_size
from swav_fast.errors import ConfigError
from swav_fast.guards import NonFiniteGuard, is_finite, state_tensors
from swav_fast.step_modes import MODES, STEP_MODES

log = logging.getLogger("swav_fast")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``: bf16 on GPU, none on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def graph_unsupported_reason(device: torch.device, optimizer: torch.optim.Optimizer,
                             scaler_enabled: bool, method: nn.Module | None = None) -> str | None:
    """Why the step cannot be captured as a CUDA graph here (None: it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the step runs on {device.type}"
    if scaler_enabled:
        return ("fp16 needs the gradient scaler, whose overflow check reads the device from the host; "
                "use train.precision=bf16")
    if not getattr(optimizer, "capturable", False):
        return (f"the optimiser {type(optimizer).__name__} reads its learning rate on the host; use LARS "
                "(optim.lars=true), whose step takes a device-tensor learning rate")
    if world_size() > 1 or isinstance(method, nn.parallel.DistributedDataParallel):
        return "capturing a step with DDP gradient all-reduces is not supported yet (several processes)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


@dataclass
class StepStats:
    """What the step did: effective mode, why it differs from the one asked for, one-off costs."""

    requested_mode: str
    mode: str
    fallback_reason: str | None = None
    compile_s: float | None = None  # first step (compile mode) or first warm-up step (graph mode)
    warmup_s: float | None = None  # all warm-up steps before the capture, compilation included
    capture_s: float | None = None  # the capture itself
    captures: int = 0
    replays: int = 0
    uncaptured_steps: int = 0  # graph mode: steps that ran as the compiled step (odd input shapes)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Frozen:
    """Snapshot of one group of frozen parameters and their optimiser state (for the tensor path)."""

    def __init__(self, params: list[nn.Parameter], until: int, keep_old: torch.Tensor,
                 tensors: list[torch.Tensor], snapshot: list[torch.Tensor]):
        self.params, self.until, self.keep_old = params, until, keep_old
        self.tensors, self.snapshot = tensors, snapshot


class TrainStep:
    """Forward + loss + backward + update of a :class:`~swav_fast.methods.Method`.

    Args:
        method: the objective with its online ``model`` (see :mod:`swav_fast.methods.base`).
        optimizer: over ``method.trainable()``'s parameters; its param groups' ``lr`` is set each call.
        device: where views are moved.
        precision: ``auto``/``fp32``/``bf16``/``fp16`` autocast.
        channels_last: convert views to channels-last memory format (the model is converted by the caller).
        mode: ``eager``, ``compile`` or ``graph``.
        debug_nan_steps: TESTING ONLY: iterations whose inputs are replaced by NaN.
        compile_options: keyword arguments of ``torch.compile`` (default: inductor, static shapes).
        graph_warmup: steps run (and undone) before the capture.
    """

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "auto", channels_last: bool = False, mode: str = "eager",
                 debug_nan_steps: Collection[int] = (), compile_options: dict[str, Any] | None = None,
                 graph_warmup: int = 3):
        STEP_MODES.get(mode)  # ConfigError naming the valid modes
        if graph_warmup < 1:
            raise ConfigError(f"graph_warmup={graph_warmup} must be >= 1 (compilation and optimiser state "
                              "must exist before the capture)")
        self.method, self.optimizer = method, optimizer
        self.device = torch.device(device)
        self.dtype = autocast_dtype(precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.channels_last = channels_last
        self.guard = NonFiniteGuard(self.device)
        self.debug_nan_steps = frozenset(debug_nan_steps)
        self.graph_warmup = int(graph_warmup)
        self._step = torch.zeros((), dtype=torch.int64, device=self.device)  # the iteration, for the hooks
        self._lr = torch.zeros((), dtype=torch.float32, device=self.device)  # read by the optimiser kernels
        self._frozen_snapshots: dict[int, list[torch.Tensor]] = {}
        self._graph: Any = None
        self._static_views: list[torch.Tensor] = []
        self._static_indices: torch.Tensor | None = None
        self._static_loss: torch.Tensor | None = None
        self._captured_state: list[torch.Tensor] = []
        #: CUDA events (graph mode). ``inputs_consumed``: the tensors given to the last call have been
        #: read (copied into the static buffers, or read by the replay) and may be overwritten.
        #: ``input_buffers_free``: the last replay is done with the static buffers of
        #: :meth:`input_buffers`; a loader that writes there waits for it on its own stream.
        self.inputs_consumed: Any = None
        self.input_buffers_free: Any = None

        reason = graph_unsupported_reason(self.device, optimizer, self.scaler.is_enabled(), method) \
            if mode == "graph" else None
        self.stats = StepStats(requested_mode=mode, mode="compile" if reason else mode,
                               fallback_reason=reason)
        set_fused = getattr(method, "set_fused", None)
        if callable(set_fused):
            set_fused(self.mode != "eager")
        self._forward = self._forward_loss
        if self.mode != "eager":
            self._forward = torch.compile(self._forward_loss, **(compile_options or {}))
        self._log_mode()

    # -- mode -----------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The mode that runs (``graph`` may have fallen back to ``compile``)."""
        return self.stats.mode

    def _log_mode(self) -> None:
        what = {"eager": "plain PyTorch",
                "compile": "torch.compile of forward + loss, device-side lr/freeze/queue flags",
                "graph": f"one CUDA graph per step, captured at the first step after {self.graph_warmup} "
                         "warm-up steps"}[self.mode]
        if self.stats.fallback_reason:
            log.warning("training step mode: compile instead of graph (%s): %s", self.stats.fallback_reason,
                        what)
        else:
            log.info("training step mode: %s (%s; autocast %s, channels_last %s)", self.mode, what,
                     self.dtype, self.channels_last)

    def _fall_back(self, reason: str) -> None:
        self.stats.mode, self.stats.fallback_reason = "compile", reason
        log.warning("training step mode: compile instead of graph (%s); the compiled step runs uncaptured",
                    reason)

    # -- pieces ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # the autocast weight cache must be off when the step is captured (a graph replays no cache)
        cache = self.stats.requested_mode == "eager"
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache)

    def _prepare(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [v.to(self.device, non_blocking=True, memory_format=fmt) for v in views]

    def _forward_loss(self, views: list[torch.Tensor], indices: torch.Tensor | None) -> torch.Tensor:
        with self._autocast():
            loss = self.method(views, indices)
        return loss.float()

    def _state(self) -> list[torch.Tensor]:
        return state_tensors((self.method,), self.optimizer)

    @contextlib.contextmanager
    def _device_lr(self, lr: float) -> Iterator[None]:
        """The param groups read the learning rate from the device tensor inside; the host value is
        put back afterwards (so ``optimizer.state_dict()`` holds plain numbers)."""
        groups = self.optimizer.param_groups
        for g in groups:
            g["lr"] = self._lr
        try:
            yield
        finally:
            for g in groups:
                g["lr"] = lr

    def __call__(self, views: Sequence[torch.Tensor], lr: float, iteration: int,
                 indices: torch.Tensor | None = None) -> torch.Tensor:
        views = faults.poison_views(self._prepare(views), iteration, self.debug_nan_steps)
        if indices is not None:
            indices = indices.to(self.device, non_blocking=True)
        if self.mode == "eager":
            return self._eager_step(views, lr, iteration, indices)
        self._lr.fill_(lr)
        self._step.fill_(iteration)
        if self.mode == "graph":
            loss = self._graph_step(views, indices, lr)
            if loss is not None:
                return loss
        return self._tensor_step(views, indices, lr)

    # -- eager (reference) ------------------------------------------------------------------------
    def _drop_frozen_grads(self, iteration: int) -> None:
        """No update at all (as with no gradient) for parameters that are still frozen."""
        for params, until in self.method.frozen_parameters():
            if iteration < until:
                for p in params:
                    p.grad = None

    def _eager_step(self, views: list[torch.Tensor], lr: float, iteration: int,
                    indices: torch.Tensor | None) -> torch.Tensor:
        self._step.fill_(iteration)
        self.guard.begin(self._state())
        loss = self._forward(views, indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._drop_frozen_grads(iteration)
        self.scaler.unscale_(self.optimizer)  # hooks (gradient clipping, ...) see true gradients
        self.method.before_update(self._step)
        # With fp16 the scaler skips (and counts) overflowing gradients itself; the loss is unscaled.
        grads = [] if self.scaler.is_enabled() else [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = is_finite(loss, grads)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_update(self._step)
        self.guard.end(finite, self._state())
        return loss.detach()

    # -- device-side step (compile, and the body of graph) ----------------------------------------
    @torch.no_grad()
    def _freeze_begin(self) -> list[_Frozen]:
        """Snapshot frozen parameters and their optimiser state (reused buffers, one multi-copy)."""
        out = []
        for params, until in self.method.frozen_parameters():
            if until <= 0 or not params:
                continue  # never frozen: nothing to do in any step
            tensors = list(params) + [v for p in params for v in self.optimizer.state.get(p, {}).values()
                                      if isinstance(v, torch.Tensor)]
            key = id(params[0])
            snap = self._frozen_snapshots.get(key)
            if snap is None or [(s.shape, s.dtype) for s in snap] != [(t.shape, t.dtype) for t in tensors]:
                snap = self._frozen_snapshots[key] = [torch.empty_like(t) for t in tensors]
            torch._foreach_copy_(snap, tensors)
            out.append(_Frozen(list(params), until, self._step < until, tensors, snap))
        return out

    @torch.no_grad()
    def _freeze_end(self, frozen: list[_Frozen]) -> None:
        """Put frozen parameters and their optimiser state back while ``step < n``; state the update
        created (a first momentum buffer) becomes zero there, i.e. "no momentum yet"."""
        for f in frozen:
            old = {id(t): s for t, s in zip(f.tensors, f.snapshot)}
            now = list(f.params) + [v for p in f.params for v in self.optimizer.state.get(p, {}).values()
                                    if isinstance(v, torch.Tensor)]
            for t in now:
                before = old.get(id(t))
                if before is None:
                    before = torch.zeros((), dtype=t.dtype, device=t.device)
                torch.where(f.keep_old, before, t, out=t)

    def _finite(self, loss: torch.Tensor, frozen: list[_Frozen]) -> torch.Tensor:
        """As the eager step: loss and gradients finite, ignoring gradients of still-frozen params."""
        if self.scaler.is_enabled():
            return is_finite(loss)
        frozen_ids = {id(p) for f in frozen for p in f.params}
        active = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None and id(p) not in frozen_ids]
        finite = is_finite(loss, active)
        for f in frozen:
            grads = [p.grad for p in f.params if p.grad is not None]
            if grads:
                ok = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
                finite = finite & (f.keep_old | ok)
        return finite

    def _body(self, views: list[torch.Tensor], indices: torch.Tensor | None) -> torch.Tensor:
        """One step with every decision on the device (what ``graph`` mode captures)."""
        self.guard.begin(self._state())
        frozen = self._freeze_begin()
        loss = self._forward(views, indices)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # as in eager: hooks (gradient clipping, ...) see true gradients
        self.method.before_update(self._step)
        finite = self._finite(loss, frozen)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._freeze_end(frozen)
        self.method.after_update(self._step)
        self.guard.end(finite, self._state())
        return loss.detach()

    def _tensor_step(self, views: list[torch.Tensor], indices: torch.Tensor | None,
                     lr: float) -> torch.Tensor:
        first = self.stats.compile_s is None and self.mode == "compile"
        start = time.perf_counter()
        with self._device_lr(lr):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._body(views, indices)
        if first:
            _sync(self.device)
            self.stats.compile_s = time.perf_counter() - start
        if self.stats.requested_mode == "graph":
            self.stats.uncaptured_steps += 1
        return loss

    # -- graph --------------------------------------------------------------------------------------
    def input_buffers(self) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
        """The static input tensors of the captured graph (views, indices), or None before the
        capture. A loader may write the next batch straight into them, after waiting for
        :attr:`input_buffers_free` on its stream (``stream.wait_event``), and pass them to the call
        (then nothing is copied); the step's stream must wait for the loader's writes as usual."""
        if self._graph is None:
            return None
        return self._static_views, self._static_indices

    def _inputs_match(self, views: list[torch.Tensor], indices: torch.Tensor | None) -> bool:
        def sig(t: torch.Tensor) -> tuple:
            return t.shape, t.dtype, t.stride(), t.device

        if len(views) != len(self._static_views) or (indices is None) != (self._static_indices is None):
            return False
        if indices is not None and sig(indices) != sig(self._static_indices):
            return False
        return all(sig(v) == sig(s) for v, s in zip(views, self._static_views))

    def _graph_step(self, views: list[torch.Tensor], indices: torch.Tensor | None,
                    lr: float) -> torch.Tensor | None:
        """Replay the captured step (capturing it first); None: run the compiled step instead."""
        if self._graph is not None and not _same_objects(self._state(), self._captured_state):
            log.warning("state tensors were replaced since the capture (a checkpoint loaded after the first "
                        "step?): capturing the training step again")
            self._graph = None
        if self._graph is None:
            if not self._capture(views, indices, lr):
                return None
        elif not self._inputs_match(views, indices):
            if self.stats.uncaptured_steps == 0:
                log.warning("a batch whose shapes differ from the captured ones runs as the compiled step "
                            "(graph mode keeps one capture)")
            return None
        stream = torch.cuda.current_stream(self.device)
        copied = False
        for static, v in zip(self._static_views, views):
            if v is not static:
                static.copy_(v, non_blocking=True)
                v.record_stream(stream)
                copied = True
        if indices is not None and indices is not self._static_indices:
            self._static_indices.copy_(indices, non_blocking=True)
            indices.record_stream(stream)
        if copied:
            self.inputs_consumed.record(stream)
        self._graph.replay()
        self.input_buffers_free.record(stream)
        if not copied:
            self.inputs_consumed.record(stream)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.stats.replays += 1
        return self._static_loss.clone()

    def _capture(self, views: list[torch.Tensor], indices: torch.Tensor | None, lr: float) -> bool:
        """Warm up on a side stream, undo the warm-up, capture the step. False: fell back."""
        device = self.device
        saved = _Saved(self._state(), self.guard, device)
        try:
            self._static_views = [torch.empty_like(v).copy_(v) for v in views]
            self._static_indices = indices.clone() if indices is not None else None
            with self._device_lr(lr):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                start = time.perf_counter()
                with torch.cuda.stream(side):
                    for i in range(self.graph_warmup):
                        self.optimizer.zero_grad(set_to_none=True)
                        self._body(self._static_views, self._static_indices)
                        if i == 0:
                            torch.cuda.synchronize(device)
                            self.stats.compile_s = time.perf_counter() - start
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                self.stats.warmup_s = time.perf_counter() - start
                saved.restore(self._state())
                self.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the grads
                graph = torch.cuda.CUDAGraph()
                start = time.perf_counter()
                # thread_local: loader threads (pinning, decoding) may keep using CUDA meanwhile
                static_loss = capture_graph(graph, lambda: self._body(self._static_views,
                                                                      self._static_indices),
                                            CudaCaptureOps(device), capture_error_mode="thread_local")
                torch.cuda.synchronize(device)
                self.stats.capture_s = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back, with the reason logged
            reason = _failure_reason(exc)  # a string: the traceback (and the tensors its frames hold) goes
        else:
            reason = None
        if reason is not None:
            self._graph = None
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            saved.restore(self._state())
            self.optimizer.zero_grad(set_to_none=True)  # gradients allocated in the failed graph's pool
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()  # the failed graph's pool, released by capture_graph, goes back
            self._fall_back(f"capture failed: {reason}")
            return False
        self._graph, self._static_loss = graph, static_loss
        self._captured_state = self._state()
        self.inputs_consumed, self.input_buffers_free = torch.cuda.Event(), torch.cuda.Event()
        self.stats.captures += 1
        log.info("captured the training step as one CUDA graph: warm-up %.1f s (first step, with "
                 "compilation, %.1f s), capture %.2f s", self.stats.warmup_s, self.stats.compile_s,
                 self.stats.capture_s)
        return True


class _Saved:
    """Values of every state tensor, the guard's counters and the CUDA RNG, to undo a warm-up."""

    def __init__(self, tensors: list[torch.Tensor], guard: NonFiniteGuard, device: torch.device):
        with torch.no_grad():
            self.values = {id(t): (t, t.detach().clone()) for t in tensors}
            self.counts = guard.state_dict()
        self.guard = guard
        self.rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @torch.no_grad()
    def restore(self, tensors: list[torch.Tensor]) -> None:
        """Old values back; tensors created since (momentum buffers) zeroed: "none yet" for SGD/LARS."""
        for t in tensors:
            entry = self.values.get(id(t))
            if entry is not None and entry[0] is t:
                t.copy_(entry[1])
            else:
                t.zero_()
        self.guard.load_state_dict(self.counts)
        if self.rng is not None:
            torch.cuda.set_rng_state(self.rng, self.device)


def _same_objects(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- owning the capture ---------------------------------------------------------------------------
class CudaCaptureOps:
    """The CUDA calls around a graph capture, in one place (the CPU tests pass a fake).

    Only calls that exist in the torch versions this project runs on (2.11 on the GPU machine, the
    pinned CPU build in CI): the allocator's pool calls are the ones ``torch.cuda.graph`` and
    ``torch.cuda.use_mem_pool`` make themselves.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def use_stream(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)  # restores the previous stream on exit, exception or not

    def is_capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def end_pool(self, pool: Any) -> bool:
        """Stop routing this device's allocations to ``pool``; False where ending the capture had done so."""
        end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
            torch._C, "_cuda_endAllocateCurrentStreamToPool")  # the older name of the same call
        try:
            end(self.index, pool)
        except RuntimeError:  # "not currently recording to mempool_id": capture_end got that far
            return False
        return True

    def release_pool(self, pool: Any) -> None:
        torch._C._cuda_releasePool(self.index, pool)

    def reset_rng(self) -> None:
        """A capture that failed before its end leaves the CUDA generator in capture mode (its epilogue
        never ran): every random op outside a capture then raises "Offset increment outside graph
        capture". Probe with one random op; where it fails, give the generator a fresh copy of its
        state (same seed and offset, out of capture mode)."""
        before = torch.cuda.get_rng_state(self.index)
        try:
            torch.empty(1, device=self.device).uniform_()
        except RuntimeError:
            gen = torch.cuda.default_generators[self.index]
            gen.graphsafe_set_state(gen.clone_state())
        torch.cuda.set_rng_state(before, self.index)


def capture_graph(graph: Any, body: Any, ops: Any, capture_error_mode: str = "global") -> Any:
    """Capture ``body()`` into ``graph`` on a new side stream and return what it returned.

    What ``torch.cuda.graph`` does, but a failure inside ``body`` or in ending the capture leaves the
    process healthy before the error propagates: the capture is ended, the allocator no longer
    routes allocations to the graph's private pool and the pool is released (its memory is freed by
    the next ``empty_cache`` once no tensor uses it), the caller's stream is current again, and the
    CUDA generator is out of capture mode. (``torch.cuda.graph``'s exit skips restoring the stream
    when ending the capture raises, and a capture that never ended never gives its pool back.)
    ``ops``: :class:`CudaCaptureOps` (or a fake with the same methods).
    """
    ops.synchronize()
    ops.empty_cache()
    pool = ops.new_pool()  # our own pool id: graph.pool() refuses to say it after a failed capture
    with ops.use_stream(ops.new_stream()):
        try:
            graph.capture_begin(pool=pool, capture_error_mode=capture_error_mode)
        except BaseException:  # e.g. cudaStreamBeginCapture failing after the pool was opened
            _abandon_capture(graph, pool, ops, end_capture=False)
            raise
        try:
            out = body()
        except BaseException:
            _abandon_capture(graph, pool, ops, end_capture=True)
            raise
        try:
            graph.capture_end()
        except BaseException:
            _abandon_capture(graph, pool, ops, end_capture=False)
            raise
    return out


def _abandon_capture(graph: Any, pool: Any, ops: Any, end_capture: bool) -> None:
    """Undo a capture that failed (the first error is the caller's to re-raise; these are logged)."""
    if end_capture:
        try:
            graph.capture_end()  # a capture the body did not invalidate ends (and instantiates) normally
        except Exception as exc:  # noqa: BLE001 - an invalidated capture: its end fails, expectedly
            log.debug("ending the failed capture: %s: %s", type(exc).__name__, exc)
    try:
        if ops.end_pool(pool):
            # The capture died before the allocator was told (cudaStreamEndCapture failed): the graph
            # never counts as captured, so its reset will not release the pool: release it here.
            ops.release_pool(pool)
        graph.reset()  # a graph whose capture did end (and was instantiated) releases its pool here
        ops.reset_rng()
    except Exception as exc:  # noqa: BLE001 - cleanup is best effort; say so and let the first error through
        log.warning("cleaning up after a failed CUDA graph capture: %s: %s", type(exc).__name__, exc)
    if ops.is_capturing():
        log.warning("the stream is still capturing after a failed CUDA graph capture")


def _failure_reason(exc: BaseException) -> str:
    """``Type: first line`` of the first error of a chain (a failed capture often re-raises later)."""
    root = exc
    for _ in range(8):
        if root.__context__ is None:
            break
        root = root.__context__
    first_line = (str(root).strip().splitlines() or [""])[0][:300]
    return f"{type(root).__name__}: {first_line}"
