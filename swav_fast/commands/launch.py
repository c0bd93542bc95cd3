"""``swav-fast launch``: several training processes via torchrun, or a SLURM batch script."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

EPILOG = """examples:
  swav-fast launch --nproc-per-node 8 -- --recipe swav_400ep_bs256 --data /imagenet/train --output runs/r50
      one node, 8 GPUs (torchrun --standalone); everything after -- goes to 'swav-fast train'
  swav-fast launch --nnodes 8 --nproc-per-node 8 --rdzv-endpoint node001:29500 -- \\
      --recipe swav_800ep_bs4096 ...
      run the same command on each of the 8 nodes
  swav-fast launch --slurm --nnodes 8 --nproc-per-node 8 --partition gpu -- --recipe swav_800ep_bs4096 \\
      --data /imagenet/train --output runs/swav800 > swav800.sbatch && sbatch swav800.sbatch
  swav-fast launch --dry-run --nproc-per-node 2 -- --device cpu      # print the torchrun command

notes:
  Without a launcher 'swav-fast train' runs one process (one GPU or the CPU). Under torchrun or srun
  each process takes the GPU of its local rank; NCCL on GPUs, gloo on the CPU. optim.batch_size is
  per process (or set optim.global_batch_size); see docs/scaling.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run training on several GPUs/nodes (torchrun) or write a SLURM script",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start 'swav-fast train' in several processes with torchrun, or print "
                                   "an sbatch script that starts one task per GPU with srun.")
    p.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS",
                   help="arguments of 'swav-fast train' (after --)")
    p.add_argument("--nproc-per-node", default="auto",
                   help="processes per node (default: the number of GPUs, or 1 without CUDA)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (several nodes)")
    p.add_argument("--rdzv-id", default="swav-fast", help="rendezvous id, the same on every node")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--slurm", action="store_true", help="print an sbatch script (srun, one task per GPU)")
    p.add_argument("--partition", help="SLURM partition (with --slurm)")
    p.add_argument("--time", default="72:00:00", help="SLURM time limit (with --slurm; default 72:00:00)")
    p.add_argument("--cpus-per-task", type=int, default=10, help="SLURM CPUs per GPU task (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from swav_fast.errors import ConfigError
    from swav_fast.launch import default_nproc_per_node, slurm_script, torchrun_command

    if args.nproc_per_node == "auto":
        nproc = default_nproc_per_node()
    else:
        try:
            nproc = int(args.nproc_per_node)
        except ValueError as exc:
            raise ConfigError(f"--nproc-per-node must be a number or auto, "
                              f"got {args.nproc_per_node!r}") from exc
    if args.slurm:
        script = slurm_script(args.train_args, args.nnodes, nproc, args.cpus_per_task, args.time,
                              args.partition)
        print(script, end="")
        return 0
    cmd = torchrun_command(args.train_args, nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # torchrun replaces this process: signals and the exit code are its own
    return 0  # pragma: no cover
