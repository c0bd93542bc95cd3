"""End to end: a real multi-crop loader feeding the training step, and where the time goes.

    python3 benchmarks/bench_e2e.py [--data DIR] [--loaders pil,torch,dali] [--mode graph]
        [--arch resnet50] [--batch 128] [--steps 30] [--json out.json] [--plot out.png]

(also ``swav-fast bench e2e ...``). Per loader backend, three measurements with the same step object:

* ``loader only``: images/s of iterating the loader (batches on the device);
* ``step only``: images/s of the step on one of the loader's batches, repeated (no loading);
* ``end to end``: the loader feeding the step, with no host synchronisation between steps (as in
  training; ``--sync-each-step`` waits for the device after every step instead). Host side, each step
  is split into *loader wait* (time blocked in ``next(loader)``) and *compute* (the step call). On CUDA,
  events recorded on the step's stream around every step also give the GPU's view: *GPU busy* (inside
  steps) and *GPU idle* (between one step's end and the next one's start: the GPU waiting for the
  loader). The bottleneck is the loader when the GPU idles more than 5% of the time (on the CPU: when
  the host waits more than 5%) and end to end keeps less than 95% of step-only, else compute.

One step object (model, optimiser, compiled code, CUDA graph) serves every loader: it is compiled
once, by the first loader's warm-up, and every loader hands it batches of the same spec.

``end to end / step only`` is the fraction of the step-only speed that training keeps. Without
``--data`` the built-in synthetic set (ImageNet-like 500x375 JPEGs) is generated once into
``~/.cache/swav-fast/bench-e2e-N``. A PNG bar chart of all stages is written next to the JSON (or to
``--plot``).
"""
from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_step import (build_swav, make_step, parse_crops, reset_memory, resolve_device,
                                   short_error)
from benchmarks.common import benchmark_main, env_info, parse_with_common, synchronize, write_atomic
from pipelines import MultiCropBatch, MultiCropSpec, available_backends, build_loader, scan_image_folder
from swav_fast.errors import ConfigError, SwavFastError

log = logging.getLogger("benchmarks")
#: Optional backend modules: importing one registers its backend (absent ones are skipped).
BACKEND_MODULES = ("pipelines.torch_backend", "pipelines.dali_backend", "pipelines.ffcv_backend")
COLUMNS = [("loader", "loader"), ("mode", "step"), ("loader_images_per_s", "loader img/s"),
           ("step_images_per_s", "step img/s"), ("e2e_images_per_s", "e2e img/s"),
           ("e2e_over_step", "e2e/step"), ("wait_ms", "wait ms"), ("compute_ms", "compute ms"),
           ("wait_fraction", "wait frac"), ("gpu_busy_ms", "GPU busy ms"), ("gpu_idle_ms", "GPU idle ms"),
           ("gpu_idle_fraction", "GPU idle frac"), ("bottleneck", "bottleneck"), ("compile_s", "compile s"),
           ("capture_s", "capture s"), ("note", "note")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageFolder (default: the built-in synthetic set)")
    p.add_argument("--images", type=int, default=None, help="synthetic images (default 2560; 64 on CPU)")
    p.add_argument("--loaders", default="pil", help="comma-separated loader backends (default pil)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core for pil)")
    p.add_argument("--mode", default=None, choices=["eager", "compile", "graph"],
                   help="step mode (default graph on CUDA, eager on CPU)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--arch", default=None, help="trunk (default resnet50; resnet10_half on CPU)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 128; 4 on CPU)")
    p.add_argument("--crops", default=None, help="COUNTxSIZE groups (default 2x224,6x96; 2x64,4x32 on CPU)")
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--hidden-dim", type=int, default=2048)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage (default 30; 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 on CPU)")
    p.add_argument("--sync-each-step", dest="sync", action="store_true",
                   help="wait for the device after each end-to-end step (then 'compute' is the step's full "
                        "time, but the loader cannot overlap the next step's GPU work)")
    p.add_argument("--plot", help="bar chart PNG (default: the JSON path with .png)")
    return parse_with_common(p, argv)


def crop_spec(crops: list[tuple[int, int]], dtype: str, channels_last: bool) -> MultiCropSpec:
    """The paper's augmentations on ``crops`` (one group: global crops only; two: globals + locals)."""
    if len(crops) > 2:
        raise ConfigError("--crops: at most two groups (global, local) for the loader benchmark")
    scales = MultiCropSpec()
    n = len(crops)
    return MultiCropSpec(num_crops=[c for c, _ in crops], size_crops=[s for _, s in crops],
                         min_scale_crops=scales.min_scale_crops[:n],
                         max_scale_crops=scales.max_scale_crops[:n],
                         dtype=dtype, channels_last=channels_last)


def synthetic_folder(num_images: int) -> Path:
    from swav_fast.data.synthetic import generate_synthetic

    root = Path(os.path.expanduser("~/.cache/swav-fast")) / f"bench-e2e-{num_images}"
    generate_synthetic(root, num_images=num_images, num_classes=10, size=(500, 375), seed=0, progress=False)
    return root


def endless(loader: Any) -> Iterator[MultiCropBatch]:
    """Batches across epochs."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise ConfigError("the loader yields no batch (fewer images than one batch?)")
        epoch += 1


def loader_workers(name: str, args: argparse.Namespace) -> int:
    """``--workers``, else one per core for pil (processes) and dali (threads), 4 for the others."""
    if args.workers is not None:
        return args.workers
    return (os.cpu_count() or 1) if name in ("pil", "dali") else 4


class StepClock:
    """Host time blocked in the loader and in the step call, and on CUDA the GPU's busy / idle time from
    event pairs recorded on the current stream around each step (read once, after the last step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.wait = self.compute = 0.0
        self.events: list[tuple[Any, Any]] = []

    def start(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()

    def end(self) -> None:
        if self.cuda:
            self.events[-1][1].record()

    def gpu(self) -> tuple[float, float] | None:
        """(busy s, idle s) summed over the steps (the device must be synchronised)."""
        if not self.cuda or not self.events:
            return None
        busy = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        idle = sum(prev[1].elapsed_time(nxt[0]) for prev, nxt in zip(self.events, self.events[1:])) / 1e3
        return busy, idle


def bench_loader(name: str, spec: MultiCropSpec, index: Any, args: argparse.Namespace,
                 device: torch.device, step: Any, counter: list[int]) -> dict[str, Any]:
    """The three measurements of one loader with the shared ``step`` (``counter[0]``: its iteration)."""
    row: dict[str, Any] = {"loader": name}
    workers = loader_workers(name, args)
    loader = build_loader(index, spec, args.batch, backend=name, device=device, seed=0, num_workers=workers)
    try:
        batches = endless(loader)
        # 1. loader only
        for _ in range(args.warmup):
            next(batches)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        synchronize(device)
        row["loader_images_per_s"] = args.steps * args.batch / (time.perf_counter() - start)

        # 2. step only, on one loader batch (the first loader's warm-up compiles and captures)
        first = next(batches)  # the step always gets the batch's indices, so nothing recompiles later
        fixed, fixed_idx = [v.clone() for v in first.views], first.indices
        it = counter[0]
        for _ in range(args.warmup):
            step(fixed, 0.6, it, fixed_idx)
            it += 1
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(fixed, 0.6, it, fixed_idx)
            it += 1
        synchronize(device)
        row["step_images_per_s"] = args.steps * args.batch / (time.perf_counter() - start)

        # 3. end to end, split into loader wait and compute
        for _ in range(args.warmup):
            data = next(batches)
            step(data.views, 0.6, it, data.indices)
            it += 1
        synchronize(device)
        clock = StepClock(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            data = next(batches)
            t1 = time.perf_counter()
            clock.start()
            step(data.views, 0.6, it, data.indices)
            clock.end()
            if args.sync:
                synchronize(device)
            t2 = time.perf_counter()
            clock.wait, clock.compute, it = clock.wait + t1 - t0, clock.compute + t2 - t1, it + 1
        synchronize(device)
        total = time.perf_counter() - start
        counter[0] = it
        stats = step.stats
        row.update(e2e_images_per_s=args.steps * args.batch / total, wait_ms=1e3 * clock.wait / args.steps,
                   compute_ms=1e3 * clock.compute / args.steps, wait_fraction=clock.wait / total,
                   mode=stats.mode, captures=stats.captures, fallback_reason=stats.fallback_reason,
                   workers=workers, bad_images=loader.num_bad)
        gpu = clock.gpu()
        if gpu is not None:
            busy, idle = gpu
            row.update(gpu_busy_ms=1e3 * busy / args.steps, gpu_idle_ms=1e3 * idle / max(1, args.steps - 1),
                       gpu_idle_fraction=idle / (busy + idle) if busy + idle > 0 else 0.0)
        row["e2e_over_step"] = row["e2e_images_per_s"] / row["step_images_per_s"]
        limiting = row["gpu_idle_fraction"] if gpu is not None else row["wait_fraction"]
        # the loader limits when the step waits for it (> 5%) and training keeps < 95% of step-only speed
        row["bottleneck"] = "loader" if limiting > 0.05 and row["e2e_over_step"] < 0.95 else "compute"
    finally:
        loader.close()
    return row


def plot(rows: list[dict[str, Any]], path: str | os.PathLike[str], title: str) -> Path:
    """Images/s of every stage per loader, and the split of an end-to-end step; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "e2e_images_per_s" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    stages = [("loader_images_per_s", "loader only"), ("step_images_per_s", "step only"),
              ("e2e_images_per_s", "end to end")]
    width = 0.8 / len(stages)
    for i, (key, label) in enumerate(stages):
        xs = [j + (i - 1) * width for j in range(len(ok))]
        bars = ax1.bar(xs, [r[key] for r in ok], width, label=label)
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
    ax1.set_xticks(range(len(ok)), [r["loader"] for r in ok])
    ax1.set_ylabel("images/s")
    ax1.set_title("throughput per stage")
    ax1.legend(fontsize=8)
    names = [r["loader"] for r in ok]
    if all("gpu_busy_ms" in r for r in ok):  # the GPU's view: busy in the step, idle waiting for data
        busy, idle = [r["gpu_busy_ms"] for r in ok], [r["gpu_idle_ms"] for r in ok]
        labels = ("GPU busy (step)", "GPU idle (waiting for the loader)")
    else:
        busy, idle = [r["compute_ms"] for r in ok], [r["wait_ms"] for r in ok]
        labels = ("compute (step)", "loader wait")
    ax2.bar(names, busy, label=labels[0])
    ax2.bar(names, idle, bottom=busy, label=labels[1])
    ax2.set_ylabel("ms per end-to-end step")
    ax2.set_title("where an end-to-end step goes")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    path = write_atomic(path, buf.getvalue())
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.mode = args.mode or ("graph" if cuda else "eager")
    precision = args.precision or ("bf16" if cuda else "fp32")
    args.arch = args.arch or ("resnet50" if cuda else "resnet10_half")
    args.batch = args.batch or (128 if cuda else 4)
    args.steps = args.steps if args.steps is not None else (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.batch < 1 or args.steps < 1 or args.warmup < 1:
        raise ConfigError("--batch, --steps and --warmup must be >= 1")
    crops = parse_crops(args.crops or ("2x224,6x96" if cuda else "2x64,4x32"))
    channels_last = cuda and precision != "fp32"
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32") if cuda else "float32"
    spec = crop_spec(crops, dtype, channels_last)
    for name in BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.info("backend module %s not importable: %s", name, exc)
    root = Path(args.data) if args.data else synthetic_folder(args.images or (2560 if cuda else 64))
    index = scan_image_folder(root)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # one step for every loader: compiled (and captured) once, by the first loader's warm-up
    method, opt = build_swav(args.arch, spec.num_views, device, args.prototypes, args.hidden_dim,
                             args.feat_dim, channels_last=channels_last)
    step = make_step(args.mode, method, opt, device, precision, channels_last, args.compile_backend)
    counter = [0]
    rows: list[dict[str, Any]] = []
    for name in args.loaders.split(","):
        if name not in available_backends():
            registered = ", ".join(available_backends())
            rows.append({"loader": name, "note": f"not available (registered: {registered})"})
            continue
        try:
            rows.append(bench_loader(name, spec, index, args, device, step, counter))
        except (RuntimeError, SwavFastError, ImportError) as exc:
            log.warning("loader %s failed: %s", name, short_error(exc))
            rows.append({"loader": name, "note": short_error(exc)})
    stats = step.stats
    compiled = next((r for r in rows if "e2e_images_per_s" in r), None)
    if compiled is not None:  # the compilation happened in the first measured loader's warm-up
        compiled.update(compile_s=stats.compile_s, capture_s=stats.capture_s)
    del step, method, opt
    reset_memory(device)
    result: dict[str, Any] = {
        "benchmark": "e2e", "env": env_info(device),
        "command": "python3 benchmarks/bench_e2e.py " + shlex.join(args.argv),
        "config": {"device": str(device), "data": str(root), "images": len(index), "mode": args.mode,
                   "precision": precision, "channels_last": channels_last, "arch": args.arch,
                   "batch": args.batch, "crops": [list(c) for c in crops], "steps": args.steps,
                   "warmup": args.warmup, "sync_each_step": args.sync, "prototypes": args.prototypes,
                   "compile_s": stats.compile_s, "capture_s": stats.capture_s, "step_mode_ran": stats.mode,
                   "compile_backend": args.compile_backend or "inductor"},
        "results": rows,
    }
    measured = [r for r in rows if "e2e_over_step" in r]
    if measured:
        best = max(measured, key=lambda r: r["e2e_images_per_s"])
        result["fastest_loader"] = {"loader": best["loader"], "e2e_images_per_s": best["e2e_images_per_s"],
                                    "e2e_over_step": best["e2e_over_step"]}
    return result


def describe(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"{cfg['arch']} batch {cfg['batch']}, {'+'.join(f'{c}x{s}' for c, s in cfg['crops'])}, step "
            f"{cfg['mode']} {cfg['precision']}, {result['env'].get('gpu', 'cpu')}")


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return f"end-to-end benchmark: {describe(result)}; {cfg['images']} images from {cfg['data']}"


def after_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The fastest loader's share of step-only throughput, and the bar chart (named in the JSON)."""
    if "fastest_loader" in result:
        f = result["fastest_loader"]
        print(f"fastest loader: {f['loader']}, {f['e2e_images_per_s']:.1f} images/s end to end = "
              f"{100 * f['e2e_over_step']:.1f}% of step-only")
    plot_path = args.plot or (str(Path(args.json_path).with_suffix(".png")) if args.json_path else None)
    if plot_path and any("e2e_images_per_s" in r for r in result["results"]):
        result["plot"] = str(plot(result["results"], plot_path, describe(result)))
        print(f"wrote {result['plot']}")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS, after_table)


if __name__ == "__main__":
    sys.exit(main())
