"""``torch.distributed`` set-up from the launcher's environment, and helpers that are no-ops alone.

Launchers and what they set (read by :func:`detect_launch`):

* nothing: one process, no process group (``swav-fast train`` on one GPU or the CPU just runs);
* ``torchrun`` (one node or several, any rendezvous): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
* ``srun`` without torchrun (one task per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODELIST``; the rendezvous is ``MASTER_ADDR`` (default: the first host
  of the node list) and ``MASTER_PORT`` (default: derived from ``SLURM_JOB_ID``). SLURM variables
  are only used inside a job step (``SLURM_STEP_ID`` set): a batch script that runs ``python``
  directly (not through ``srun``) inherits ``SLURM_NTASKS`` of the whole job and must not wait for
  tasks that were never started.

With more than one process, :func:`init_distributed` picks the device of the local rank
(``cuda:LOCAL_RANK``, or the CPU), the backend (NCCL on GPUs, gloo on the CPU) and creates the
default process group, plus a small gloo group for host-side agreements (stop requests, checkpoint
outcomes) that never touch the GPU stream.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from swav_fast.errors import ConfigError

log = logging.getLogger("swav_fast")

#: Default ``MASTER_PORT`` under SLURM is ``_SLURM_PORT_BASE + SLURM_JOB_ID % _SLURM_PORT_SPAN``.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 20000
_control_group: Any = None  # gloo group for host-side flags (the default group when it is gloo)
_control_world: Any = None  # the default group _control_group belongs to


# -- queries (no-ops in one process) ---------------------------------------------------------------
def is_dist() -> bool:
    """True when a process group is initialised (torchrun / SLURM / explicit init)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs and writes files."""
    return rank() == 0


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; returns ``tensor`` unchanged in one process."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank order, without
    gradient; ``tensor`` itself in one process. For state every rank must hold alike (memory bank
    rows, queued keys)."""
    return _gather_rows(tensor.detach()) if is_dist() else tensor


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather of ``tensor`` along dim 0, in rank order (no autograd)."""
    t = tensor.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def gather_samples(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Per-view embeddings ``[V, B, D]`` of every rank as ``[V, W*B, D]`` (this rank's samples at
    ``rank*B``), by :func:`gather_with_grad` or, for tensors without gradient, :func:`all_gather_cat`;
    ``x`` itself in one process."""
    if not is_dist():
        return x
    num_views, batch, dim = x.shape
    rows = x.transpose(0, 1).reshape(batch, num_views * dim)  # one row per sample, all its views
    rows = gather_with_grad(rows) if with_grad else all_gather_cat(rows)
    return rows.reshape(-1, num_views, dim).transpose(0, 1)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward: this rank's rows of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return _gather_rows(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on these rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce (sum); backward: the gradient summed over ranks (every rank uses the sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    r"""Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank order,
    differentiably; ``tensor`` itself in one process.

    For losses whose every term sees every rank's rows (SimCLR's negatives): with each rank's loss
    :math:`L_s` computed from the gathered rows, rank :math:`r`'s rows get
    :math:`\sum_s \partial L_s / \partial x_r`, so after DDP averages the parameter gradients they
    are those of :math:`\frac{1}{W}\sum_s L_s`, the loss of one process on the whole batch."""
    return _GatherRows.apply(tensor) if is_dist() else tensor


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    r"""The sum of ``tensor`` over ranks, differentiably (each rank's input gets the sum of every
    rank's gradient of the result); ``tensor`` itself in one process. For batch statistics that a
    loss needs over the global batch (Barlow Twins' standardisation and cross-correlation)."""
    return _SumOverRanks.apply(tensor) if is_dist() else tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a new tensor); ``tensor`` itself in one process."""
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


# -- launch environment ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits: from torchrun's or SLURM's variables, or a single process."""

    launcher: str  # "none" | "torchrun" | "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (``node[003-005,9],gpu1`` -> ``node003``).

    Every bracket group contributes its first number (zero padding kept); text outside brackets is
    copied; the list ends at the first top-level comma.
    """
    out, i = [], 0
    while i < len(nodelist):
        c = nodelist[i]
        if c == ",":
            break
        if c == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise ConfigError(f"SLURM node list {nodelist!r} has an unclosed '['")
            first = re.split(r"[,-]", nodelist[i + 1:end])[0]
            if not first.isdigit():
                raise ConfigError(f"SLURM node list {nodelist!r}: cannot read the range "
                                  f"{nodelist[i:end + 1]}")
            out.append(first)
            i = end + 1
            continue
        out.append(c)
        i += 1
    host = "".join(out).strip()
    if not host:
        raise ConfigError(f"SLURM node list {nodelist!r} names no host")
    return host


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables (torchrun first, then an ``srun`` job step); none: one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        local_world = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        info = LaunchInfo("torchrun", _int_env(env, "RANK"), world,
                          _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, local_world,
                          env.get("MASTER_ADDR"), port)
        if info.distributed and (info.master_addr is None or info.master_port is None):
            raise ConfigError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: launch with "
                              "torchrun (or set both), or unset RANK/WORLD_SIZE for a single process")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = _int_env(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        nodes = _int_env(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else 1
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        else:
            job = _int_env(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
            port = _SLURM_PORT_BASE + job % _SLURM_PORT_SPAN
        info = LaunchInfo("slurm", _int_env(env, "SLURM_PROCID"), world,
                          _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                          max(1, world // max(nodes, 1)), addr, port)
    else:
        return LaunchInfo("none")
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ConfigError(f"inconsistent {info.launcher} environment: rank {info.rank}, world size "
                          f"{info.world_size}, local rank {info.local_rank}")
    return info


def device_for(name: str, local_rank: int, distributed: bool) -> torch.device:
    """The training device: ``auto``/``cuda`` mean ``cuda:LOCAL_RANK`` under a launcher (else cuda:0 or
    the CPU); an explicit ``cuda:N`` or ``cpu`` is kept."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    if name == "cuda":
        if distributed:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} has no GPU: this node has "
                                  f"{torch.cuda.device_count()}; start at most that many processes per node")
            return torch.device("cuda", local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# -- process group ---------------------------------------------------------------------------------
def init_distributed(device_name: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0,
                     env: Mapping[str, str] | None = None) -> tuple[torch.device, bool]:
    """Create the default process group from the launcher's environment (when there is one).

    Returns ``(device, created)``: the device of this process and whether this call created the
    group (then :func:`destroy` should end it). An existing group (initialised by the caller) is
    used as it is; one process without a launcher creates nothing.
    """
    if is_dist():
        info = detect_launch(env)
        device = device_for(device_name, info.local_rank, world_size() > 1)
        _setup_after_init(device)
        return device, False
    if backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"dist.backend={backend!r} is not valid; valid: auto, nccl, gloo")
    info = detect_launch(env)
    device = device_for(device_name, info.local_rank, info.distributed)
    if not info.distributed:
        return device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = default_backend(device) if backend == "auto" else backend
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs GPUs; use gloo (or auto) on the CPU")
    dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    _setup_after_init(device)
    if info.rank == 0:
        log.info("process group: %s, %d processes (launcher %s; rank 0 on %s)", backend, info.world_size,
                 info.launcher, device)
    return device, True


def _setup_after_init(device: torch.device) -> None:
    """Set the CUDA device; (re)create the control group for the current default group."""
    global _control_group, _control_world
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size() > 1 and (_control_group is None or _control_world is not dist.group.WORLD):
        _control_world = dist.group.WORLD
        _control_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                          else dist.new_group(backend="gloo"))


def control_group() -> Any:
    """A gloo group over all ranks for host-side values (CPU tensors, no GPU stream involved)."""
    if _control_group is None or _control_world is not dist.group.WORLD:
        _setup_after_init(torch.device("cpu"))
    return _control_group


def destroy(barrier: bool = False) -> None:
    """End the process group (and the control group); nothing in one process. With ``barrier`` every
    rank first waits for the others (after a clean run): a rank that tears its group down while a
    slower peer still talks to it makes that peer's communication thread abort the process
    ("terminate called without an active exception")."""
    global _control_group, _control_world
    if is_dist():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _control_group = _control_world = None


def quiet_other_ranks(logger: logging.Logger = log) -> None:
    """Ranks other than 0 keep only warnings and errors, tagged with their rank."""
    if is_main() or any(isinstance(f, _RankFilter) for f in logger.filters):
        return
    logger.addFilter(_RankFilter(rank()))


class _RankFilter(logging.Filter):
    def __init__(self, rank_: int):
        super().__init__()
        self.rank = rank_

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if not str(record.msg).startswith("[rank"):
            record.msg = f"[rank {self.rank}] {record.msg}"
        return True


# -- host-side agreements (gloo control group) -----------------------------------------------------
def agree_max(values: list[int]) -> list[int]:
    """Element-wise max of small integers over ranks (host side); ``values`` alone in one process."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return [int(v) for v in t.tolist()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable plain data; host side)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


class StopAgreement:
    """All ranks stop at the same step boundary, whichever rank got the signal.

    Wraps :class:`swav_fast.preemption.StopSignals`: :meth:`agree` (called by every rank at the
    same point of every step) combines the local requests with a max over ranks; ``requested``,
    ``signum`` and ``name`` then report the agreed values. In one process it is the local request.
    """

    def __init__(self, stop: Any):
        self.local = stop
        self._signum: int | None = None

    def agree(self) -> bool:
        if self._signum is None:
            (signum,) = agree_max([self.local.signum or 0])
            self._signum = signum or None
        return self._signum is not None

    @property
    def requested(self) -> bool:
        return self._signum is not None

    @property
    def signum(self) -> int | None:
        return self._signum

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self._signum).name if self._signum is not None else ""
