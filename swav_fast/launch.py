"""Launch recipes for multi-process training: the ``torchrun`` command line and a SLURM batch script.

``swav-fast train`` itself needs no launcher on one GPU or the CPU. For several processes either

* ``torchrun`` starts them (one node: ``--standalone``; several: the same command on every node
  with a c10d rendezvous at ``HOST:PORT``) and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/...; or
* SLURM's ``srun`` starts one task per GPU and :mod:`swav_fast.distributed` reads ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list.

:func:`torchrun_command` and :func:`slurm_script` write those out; ``swav-fast launch`` runs the
first or prints the second.
"""
from __future__ import annotations

import shlex
import sys
from typing import Sequence

from swav_fast.errors import ConfigError

#: Seconds before the time limit at which SLURM sends SIGTERM (the trainer then checkpoints and exits).
SLURM_SIGNAL_LEAD_S = 180


def default_nproc_per_node() -> int:
    """GPUs on this machine, or 1 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_command(train_args: Sequence[str], nproc_per_node: int, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "swav-fast",
                     python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run ... -m swav_fast train ARGS`` for this node.

    One node: ``--standalone`` (a local rendezvous on a free port). Several: run the same command
    on every node with the same ``rdzv_endpoint`` (``HOST:PORT`` of any one node) and ``rdzv_id``.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be >= 1, got {nnodes}")
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and not rdzv_endpoint:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise ConfigError("several nodes need --rdzv-endpoint HOST:PORT (a node every node can reach; "
                              "the same on all nodes)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "swav_fast", "train", *train_args]


def slurm_script(train_args: Sequence[str], nodes: int, gpus_per_node: int, cpus_per_task: int = 10,
                 time: str = "72:00:00", partition: str | None = None, job_name: str = "swav-fast",
                 python: str = "python3") -> str:
    """An ``sbatch`` script: one task per GPU started by ``srun`` (no torchrun), requeue on
    preemption, ``--resume auto`` so a requeued or resubmitted job continues from its checkpoint."""
    if nodes < 1 or gpus_per_node < 1 or cpus_per_task < 1:
        raise ConfigError("nodes, gpus per node and cpus per task must all be >= 1")
    args = list(train_args)
    if "--resume" not in args:
        args += ["--resume", "auto"]
    if "--output" not in args and not any(a.startswith("train.output_dir=") for a in args):
        raise ConfigError("give the run folder (--output RUN): a requeued job resumes from its checkpoints")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        f"#SBATCH --signal=TERM@{SLURM_SIGNAL_LEAD_S}",
        "#SBATCH --requeue",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "",
        f"# {nodes * gpus_per_node} processes ({nodes} node(s) x {gpus_per_node} GPU(s)); swav-fast reads",
        "# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID itself. SIGTERM (preemption, or the time limit",
        f"# {SLURM_SIGNAL_LEAD_S} s ahead) makes every rank stop at the same step after a checkpoint.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f"export OMP_NUM_THREADS={max(1, cpus_per_task // 2)}",
        "",
        "srun --kill-on-bad-exit=1 " + shlex.join([python, "-m", "swav_fast", "train", *args]),
        "",
    ]
    return "\n".join(lines)
