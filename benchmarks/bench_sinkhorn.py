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
measured on this device (a device-to-device copy far larger than the L2 cache, timed with CUDA events):
``bytes / bandwidth``. Timed calls rotate through ``--sets`` input sets (default: enough that together
they are at least 4x the GPU's L2 cache; a 4096x3000 float32 matrix is 49 MB, inside an H200's 60 MB
L2), so a call cannot read its inputs from the cache the previous call left them in.
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
    p.add_argument("--sets", type=int, default=None,
                   help="input sets the timed calls rotate through (default: 4x the L2 cache; 2 on CPU)")
    return parse_with_common(p, argv)


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size (0 on the CPU or where torch does not report it)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def default_sets(device: torch.device, smallest_problem_bytes: int) -> int:
    """Input sets whose inputs together are >= 4x the L2 cache (2..64 on CUDA; 2 on the CPU)."""
    if device.type != "cuda":
        return 2
    l2 = l2_bytes(device) or 64 * 2**20
    return max(2, min(64, -(-4 * l2 // max(1, smallest_problem_bytes // 2))))


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of a few; CUDA events
    on the GPU (one copy each, after a warm-up copy), wall clock on the CPU."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(time_per_call(lambda k: dst.copy_(src), device, 1) for _ in range(5))
    return 2 * src.numel() * 4 / best


def time_per_call(fn: Callable[[int], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn(k)``, ``k = 0..repeats-1`` (CUDA events on the GPU, wall clock on the
    CPU); the device is synchronised only before the first call and after the last."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for k in range(repeats):
            fn(k)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    start_s = time.perf_counter()
    for k in range(repeats):
        fn(k)
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


def problem_bytes(args: argparse.Namespace) -> dict[str, int]:
    """Bytes each problem must read and write once (its floor's numerator)."""
    k, rows, b, v = args.prototypes, args.rows, args.loss_batch, args.views
    return {"sinkhorn": 2 * rows * k * 4, "sinkhorn+loss": (v * b + len(ASSIGN) * (rows - b)) * k * 4}


def make_inputs(args: argparse.Namespace, device: torch.device, sets: int) -> dict[str, dict[str, Any]]:
    """Per problem: ``sets`` independent input sets (``inputs`` is their list), shape and bytes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    k, rows, b, v = args.prototypes, args.rows, args.loss_batch, args.views
    queue_rows = rows - b
    nbytes = problem_bytes(args)

    def cosine(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1).to(device)

    return {
        "sinkhorn": {"inputs": [{"scores": cosine(rows, k)} for _ in range(sets)], "shape": f"{rows}x{k}",
                     "bytes": nbytes["sinkhorn"]},
        "sinkhorn+loss": {"inputs": [{"views": cosine(v, b, k), "queue": cosine(len(ASSIGN), queue_rows, k)}
                                     for _ in range(sets)],
                          "shape": f"{v}x{b}x{k} + queue {queue_rows}", "bytes": nbytes["sinkhorn+loss"]},
    }


def graph_of(fn: Callable[[dict], Any], inputs: dict, device: torch.device) -> Callable[[], Any]:
    """Capture ``fn(inputs)`` (already warmed up) in a CUDA graph; the call replays it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(inputs)
    return graph.replay


def rotating_call(fn: Callable[[dict], Any], sets: list[dict], mode: str,
                  device: torch.device) -> Callable[[int], Any]:
    """``call(k)`` runs ``fn`` on input set ``k % len(sets)`` (graph mode: replays that set's graph)."""
    if mode == "graph":
        replays = [graph_of(fn, inputs, device) for inputs in sets]
        return lambda k: replays[k % len(replays)]()
    return lambda k: fn(sets[k % len(sets)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"--modes: unknown {', '.join(bad)}; valid: {', '.join(MODES)}")
    if args.loss_batch >= args.rows or args.rows < 2 or args.prototypes < 2 or args.views < 2:
        raise ConfigError("need --rows > --loss-batch >= 1, --prototypes >= 2, --views >= 2")
    repeats = args.repeats or (100 if device.type == "cuda" else 5)
    sets = args.sets or default_sets(device, min(problem_bytes(args).values()))
    if sets < 1:
        raise ConfigError("--sets must be >= 1")
    # the copy: >= 8x the L2 cache (and >= 512 MB) on the GPU, so it streams from HBM
    copy_mb = max(512, 8 * l2_bytes(device) // 2**20) if device.type == "cuda" else 64
    bandwidth = copy_bandwidth(device, copy_mb)
    problems, impls = make_inputs(args, device, sets), implementations(args, device)
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
                fn(inputs[0])
                synchronize(device)
                if mode != "eager":
                    row["compile_s"] = time.perf_counter() - start
                for k in range(max(args.warmup, len(inputs))):  # every set once (no recompiles)
                    fn(inputs[k % len(inputs)])
                seconds = time_per_call(rotating_call(fn, inputs, mode, device), device, repeats)
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
                   "sets": sets, "copy_mb": copy_mb, "l2_mb": l2_bytes(device) / 2**20,
                   "timing": "CUDA events" if device.type == "cuda" else "wall clock",
                   "compile_backend": args.compile_backend or "inductor"},
        "results": rows,
    }


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"Sinkhorn benchmark on {result['env'].get('gpu', 'cpu')}: {cfg['iters']} iterations, "
            f"copy bandwidth {cfg['copy_bandwidth_gbs']:.0f} GB/s, {cfg['repeats']} timed calls rotating "
            f"{cfg['sets']} input sets")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
