"""CPU threads: training-step images/s of the main job's model at 1, 2 and the auto-chosen threads.

    python3 benchmarks/bench_threads.py [--threads 1,2,auto,default] [--busy 1] [--recipe quick]
        [--batch 64] [--steps 10] [--warmup 2] [--json out.json]

(also ``swav-fast bench threads ...``). The step is the one ``swav-fast train`` runs for the recipe
(its method, trunk, heads, crops, optimiser; eager :class:`~swav_fast.step.TrainStep` on the CPU),
fed synthetic views of the recipe's crop sizes. ``--busy N`` starts N processes that keep a core busy
while the steps are timed, as the recipe's loader workers do during training (default: the recipe's
``data.workers``). ``auto`` is what ``train.threads=0`` chooses here (:mod:`swav_fast.threads`: usable
cores from the affinity mask and cgroup quota, minus the loader workers); ``default`` is torch's own
default (one thread per core). ``x auto`` is each row's images/s over the auto row's.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_step import synthetic_views, time_steps
from benchmarks.common import benchmark_main, env_info
from swav_fast.config import load_config
from swav_fast.errors import ConfigError
from swav_fast.methods import build_method
from swav_fast.step import TrainStep
from swav_fast.threads import machine_threads
from swav_fast.run import build_optimizer, check_config

COLUMNS = [("threads", "threads"), ("num_threads", "n"), ("busy", "busy procs"), ("images_per_s", "images/s"),
           ("ratio", "x auto"), ("step_ms", "ms/step"), ("note", "note")]


def _spin(stop_at: float) -> None:
    """Keep one core busy until ``stop_at`` (time.time()), like a decoding loader worker."""
    x = 0
    while time.time() < stop_at:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench threads", description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2,auto,default",
                   help="comma-separated thread counts; 'auto' = train.threads=0's choice, "
                        "'default' = torch's")
    p.add_argument("--recipe", default="quick",
                   help="recipe whose model and crops are stepped (default quick)")
    p.add_argument("--busy", type=int, default=None,
                   help="busy processes during the timing (default: the recipe's data.workers)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (default 2)")
    p.add_argument("--json", dest="json_path", help="write the results here (JSON)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.steps < 1 or args.warmup < 1 or (args.batch is not None and args.batch < 1):
        raise ConfigError("--steps, --warmup and --batch must be >= 1")
    return args


def thread_counts(spec: str, auto: int, default: int) -> list[tuple[str, int]]:
    """``"1,2,auto"`` -> [("1", 1), ("2", 2), ("auto", auto)]."""
    out = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        if word in ("auto", "default"):
            out.append((word, auto if word == "auto" else default))
        elif word.isdigit() and int(word) > 0:
            out.append((word, int(word)))
        else:
            raise ConfigError(f"--threads: {word!r} is not a positive number, auto or default")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.recipe, ["train.device=cpu"])
    if args.batch:
        cfg.optim.batch_size = args.batch
    check_config(cfg)
    busy = cfg.data.workers if args.busy is None else max(0, args.busy)
    default = torch.get_num_threads()
    choice = machine_threads(0, busy)
    device = torch.device("cpu")
    crops = list(zip(cfg.data.crops.num_crops, cfg.data.crops.size_crops))
    inputs = [synthetic_views(crops, cfg.optim.batch_size, device, torch.float32, False, seed)
              for seed in (0, 1)]
    rows = []
    try:
        for label, n in thread_counts(args.threads, choice.threads, default):
            torch.manual_seed(0)
            method = build_method(cfg.train.method, cfg)
            method.on_train_start(max(1024, cfg.optim.batch_size), 10_000)
            step = TrainStep(method, build_optimizer(cfg, method.trainable()), device, "fp32", False,
                             mode="eager")
            torch.set_num_threads(n)
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            procs = [ctx.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(busy)]
            for p in procs:
                p.start()
            time.sleep(0.2 if procs else 0)  # let them reach the loop
            try:
                _, _, seconds = time_steps(step, inputs, 0.01, args.warmup, args.steps, device)
            finally:
                for p in procs:
                    p.terminate()
                    p.join()
            ips = args.steps * cfg.optim.batch_size / seconds
            rows.append({"threads": label, "num_threads": n, "busy": busy, "images_per_s": ips,
                         "step_ms": 1000 * seconds / args.steps,
                         "note": choice.describe() if label == "auto" else ""})
    finally:
        torch.set_num_threads(default)
    auto_rows = [r for r in rows if r["threads"] == "auto"]
    for r in rows:
        r["ratio"] = r["images_per_s"] / auto_rows[0]["images_per_s"] if auto_rows else None
    return {"benchmark": "threads", "env": env_info(device), "command": ["swav-fast", "bench", "threads",
                                                                        *args.argv],
            "recipe": args.recipe, "arch": cfg.model.arch, "batch": cfg.optim.batch_size, "crops": crops,
            "auto": {"threads": choice.threads, "usable_cpus": choice.usable_cpus,
                     "affinity": choice.affinity, "quota": choice.quota,
                     "loader_workers": choice.loader_workers},
            "results": rows}


def headline(result: dict[str, Any]) -> str:
    a = result["auto"]
    return (f"CPU threads: recipe {result['recipe']} ({result['arch']}, batch {result['batch']}, crops "
            f"{result['crops']}); auto = {a['threads']} thread(s) from {a['usable_cpus']} usable core(s) - "
            f"{a['loader_workers']} loader worker(s)")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
