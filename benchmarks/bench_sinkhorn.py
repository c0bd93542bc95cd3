"""Sinkhorn (and Sinkhorn + swapped loss) time per call, per implementation, against the bytes floor.

    python3 benchmarks/bench_sinkhorn.py [--rows 4096] [--prototypes 3000] [--iters 3]
        [--views 8] [--loss-batch 256] [--modes eager,compile,fused,graph] [--json out.json]

(also ``swav-fast bench sinkhorn ...``). Two problems:

* ``sinkhorn``: codes of one ``[rows, prototypes]`` float32 score matrix (epsilon 0.05).
* ``sinkhorn+loss``: the SwAV loss of ``--views`` views of ``--loss-batch`` samples, codes of the first
  two views computed over ``rows`` rows (the batch plus ``rows - loss-batch`` queue rows, queue in use).
  Forward only.

Implementations (``--modes``): ``eager`` (:func:`swav_fast.losses.sinkhorn_knopp` and the eager loss),
``compile`` (plain ``torch.compile`` of those same eager functions), ``fused`` (``torch.compile`` of
:mod:`swav_fast.losses.fused`), ``graph`` (``fused`` replayed from a CUDA graph; CUDA only).

The floor is the time to read every input once and write every output once at the copy bandwidth
measured on this device (a large device-to-device copy): ``bytes / bandwidth``.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_step import resolve_device, short_error
from benchmarks.common import benchmark_main, env_info, parse_with_common, synchronize
from swav_fast.errors import ConfigError
from swav_fast.losses import sinkhorn_knopp, swapped_prediction_loss
from swav_fast.losses.fused import compiled

log = logging.getLogger("benchmarks")
MODES = ("eager", "compile", "fused", "graph")
ASSIGN = [0, 1]
COLUMNS = [("problem", "problem"), ("mode", "mode"), ("shape", "shape"), ("us_per_call", "us/call"),
           ("floor_us", "floor us"), ("x_floor", "x floor"), ("compile_s", "compile s"), ("note", "note")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench sinkhorn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="Sinkhorn rows (samples, queue included)")
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--iters", type=int, default=3, help="Sinkhorn iterations")
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--views", type=int, default=8, help="views of the loss problem")
    p.add_argument("--loss-batch", type=int, default=256, help="samples per view of the loss problem")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 100 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation)")
    return parse_with_common(p, argv)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of a few."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def time_per_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call (CUDA events on the GPU, wall clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        synchronize(device)
        return start.elapsed_time(end) / 1e3 / repeats
    start_s = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start_s) / repeats


def eager_loss(scores: torch.Tensor, queue_scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """The eager path of SwAVObjective with a full, active queue."""
    codes = []
    for j, view in enumerate(ASSIGN):
        s = torch.cat([queue_scores[j], scores[view]])
        codes.append(sinkhorn_knopp(s, epsilon, iters)[-scores.shape[1]:])
    return swapped_prediction_loss(scores, torch.stack(codes), ASSIGN, 0.1)


def implementations(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Callable]]:
    """``{problem: {mode: fn(inputs) -> tensor}}``."""
    opts = {"backend": args.compile_backend} if args.compile_backend else {}
    eps, iters = args.epsilon, args.iters
    use = torch.ones((), dtype=torch.bool, device=device)
    fused_codes, fused_loss = compiled("codes", **opts), compiled("loss", **opts)
    plain_codes = torch.compile(sinkhorn_knopp, dynamic=False, **opts)
    plain_loss = torch.compile(eager_loss, dynamic=False, **opts)
    return {
        "sinkhorn": {
            "eager": lambda x: sinkhorn_knopp(x["scores"], eps, iters),
            "compile": lambda x: plain_codes(x["scores"], eps, iters),
            "fused": lambda x: fused_codes(x["scores"], eps, iters),
        },
        "sinkhorn+loss": {
            "eager": lambda x: eager_loss(x["views"], x["queue"], eps, iters),
            "compile": lambda x: plain_loss(x["views"], x["queue"], eps, iters),
            "fused": lambda x: fused_loss(x["views"], ASSIGN, 0.1, eps, iters, x["queue"], use),
        },
    }


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    k, rows, b, v = args.prototypes, args.rows, args.loss_batch, args.views
    queue_rows = rows - b

    def cosine(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1).to(device)

    return {
        "sinkhorn": {"inputs": {"scores": cosine(rows, k)}, "shape": f"{rows}x{k}",
                     "bytes": 2 * rows * k * 4},
        "sinkhorn+loss": {"inputs": {"views": cosine(v, b, k), "queue": cosine(len(ASSIGN), queue_rows, k)},
                          "shape": f"{v}x{b}x{k} + queue {queue_rows}",
                          "bytes": (v * b + len(ASSIGN) * queue_rows) * k * 4},
    }


def graph_of(fn: Callable[[dict], Any], inputs: dict, device: torch.device) -> Callable[[], Any]:
    """Capture ``fn(inputs)`` (already warmed up) in a CUDA graph; the call replays it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(inputs)
    return graph.replay


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"--modes: unknown {', '.join(bad)}; valid: {', '.join(MODES)}")
    if args.loss_batch >= args.rows or args.rows < 2 or args.prototypes < 2 or args.views < 2:
        raise ConfigError("need --rows > --loss-batch >= 1, --prototypes >= 2, --views >= 2")
    repeats = args.repeats or (100 if device.type == "cuda" else 5)
    bandwidth = copy_bandwidth(device, 512 if device.type == "cuda" else 64)
    problems, impls = make_inputs(args, device), implementations(args, device)
    rows: list[dict[str, Any]] = []
    for name, problem in problems.items():
        floor = problem["bytes"] / bandwidth
        for mode in modes:
            row: dict[str, Any] = {"problem": name, "mode": mode, "shape": problem["shape"],
                                   "bytes": problem["bytes"], "floor_us": 1e6 * floor}
            if mode == "graph" and device.type != "cuda":
                rows.append({**row, "note": "CUDA graphs need a CUDA device"})
                continue
            try:
                fn = impls[name]["fused" if mode == "graph" else mode]
                inputs = problem["inputs"]
                start = time.perf_counter()
                fn(inputs)
                synchronize(device)
                if mode != "eager":
                    row["compile_s"] = time.perf_counter() - start
                for _ in range(args.warmup):
                    fn(inputs)
                if mode == "graph":
                    call = graph_of(fn, inputs, device)
                else:
                    def call(fn=fn, inputs=inputs):
                        return fn(inputs)
                seconds = time_per_call(call, device, repeats)
                row.update(us_per_call=1e6 * seconds, x_floor=seconds / floor)
            except Exception as exc:  # noqa: BLE001 - one failing implementation is a row, not a crash
                row["note"] = short_error(exc)
            rows.append(row)
    return {
        "benchmark": "sinkhorn", "env": env_info(device),
        "command": "python3 benchmarks/bench_sinkhorn.py " + shlex.join(args.argv),
        "config": {"device": str(device), "rows": args.rows, "prototypes": args.prototypes,
                   "iters": args.iters,
                   "epsilon": args.epsilon, "views": args.views, "loss_batch": args.loss_batch,
                   "repeats": repeats, "warmup": args.warmup, "copy_bandwidth_gbs": bandwidth / 1e9,
                   "compile_backend": args.compile_backend or "inductor"},
        "results": rows,
    }


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"Sinkhorn benchmark on {result['env'].get('gpu', 'cpu')}: {cfg['iters']} iterations, "
            f"copy bandwidth {cfg['copy_bandwidth_gbs']:.0f} GB/s, {cfg['repeats']} timed calls")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
