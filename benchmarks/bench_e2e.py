"""End to end: a real multi-crop loader feeding the training step, and where the time goes.

    python3 benchmarks/bench_e2e.py [--data DIR] [--loaders pil,torch,dali] [--mode graph]
        [--arch resnet50] [--batch 128] [--steps 30] [--json out.json] [--plot out.png]

(also ``swav-fast bench e2e ...``). Per loader backend, three measurements with the same step object:

* ``loader only``: images/s of iterating the loader (batches on the device);
* ``step only``: images/s of the step on one of the loader's batches, repeated (no loading);
* ``end to end``: the loader feeding the step. Each step is split into *loader wait* (time blocked in
  ``next(loader)``) and *compute* (the step call until the device is done), so the bottleneck shows:
  a wait fraction near 0 means the GPU is the limit, a large one means the loader is.

``end to end / step only`` is the fraction of the step-only speed that training keeps. Without
``--data`` the built-in synthetic set (ImageNet-like 500x375 JPEGs) is generated once into
``~/.cache/swav-fast/bench-e2e-N``. A PNG bar chart of all stages is written next to the JSON (or to
``--plot``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_step import (build_swav, make_step, parse_crops, reset_memory, resolve_device,
                                   short_error)
from benchmarks.common import benchmark_main, env_info, parse_with_common, synchronize
from pipelines import MultiCropBatch, MultiCropSpec, available_backends, build_loader, scan_image_folder
from swav_fast.errors import ConfigError, SwavFastError

log = logging.getLogger("benchmarks")
#: Optional backend modules: importing one registers its backend (absent ones are skipped).
BACKEND_MODULES = ("pipelines.torch_backend", "pipelines.dali_backend", "pipelines.ffcv_backend")
COLUMNS = [("loader", "loader"), ("mode", "step"), ("loader_images_per_s", "loader img/s"),
           ("step_images_per_s", "step img/s"), ("e2e_images_per_s", "e2e img/s"),
           ("e2e_over_step", "e2e/step"), ("wait_ms", "wait ms"), ("compute_ms", "compute ms"),
           ("wait_fraction", "wait frac"), ("bottleneck", "bottleneck"), ("compile_s", "compile s"),
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
    p.add_argument("--no-sync", dest="sync", action="store_false",
                   help="do not wait for the device after each end-to-end step (then 'compute' is launch "
                        "time only and the wait absorbs the rest)")
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


def bench_loader(name: str, spec: MultiCropSpec, index: Any, args: argparse.Namespace,
                 device: torch.device, precision: str, channels_last: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"loader": name}
    if args.workers is not None:
        workers = args.workers
    else:
        workers = (os.cpu_count() or 1) if name == "pil" else 4
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

        # 2. step only, on one loader batch
        method, opt = build_swav(args.arch, spec.num_views, device, args.prototypes, args.hidden_dim,
                                 args.feat_dim, channels_last=channels_last)
        step = make_step(args.mode, method, opt, device, precision, channels_last, args.compile_backend)
        fixed = [v.clone() for v in next(batches).views]
        it = 0
        for _ in range(args.warmup):
            step(fixed, 0.6, it)
            it += 1
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(fixed, 0.6, it)
            it += 1
        synchronize(device)
        row["step_images_per_s"] = args.steps * args.batch / (time.perf_counter() - start)

        # 3. end to end, split into loader wait and compute
        for _ in range(args.warmup):
            step(next(batches).views, 0.6, it)
            it += 1
        synchronize(device)
        wait = compute = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            data = next(batches)
            t1 = time.perf_counter()
            step(data.views, 0.6, it, data.indices)
            if args.sync:
                synchronize(device)
            t2 = time.perf_counter()
            wait, compute, it = wait + t1 - t0, compute + t2 - t1, it + 1
        synchronize(device)
        total = time.perf_counter() - start
        stats = step.stats
        row.update(e2e_images_per_s=args.steps * args.batch / total, wait_ms=1e3 * wait / args.steps,
                   compute_ms=1e3 * compute / args.steps, wait_fraction=wait / total,
                   mode=stats.mode, compile_s=stats.compile_s, capture_s=stats.capture_s,
                   captures=stats.captures, fallback_reason=stats.fallback_reason, workers=workers,
                   bad_images=loader.num_bad)
        row["e2e_over_step"] = row["e2e_images_per_s"] / row["step_images_per_s"]
        row["bottleneck"] = "loader" if row["wait_fraction"] > 0.05 else "compute"
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
    ax2.bar(names, [r["compute_ms"] for r in ok], label="compute (step)")
    ax2.bar(names, [r["wait_ms"] for r in ok], bottom=[r["compute_ms"] for r in ok], label="loader wait")
    ax2.set_ylabel("ms per end-to-end step")
    ax2.set_title("where an end-to-end step goes")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    rows: list[dict[str, Any]] = []
    for name in args.loaders.split(","):
        if name not in available_backends():
            registered = ", ".join(available_backends())
            rows.append({"loader": name, "note": f"not available (registered: {registered})"})
            continue
        try:
            rows.append(bench_loader(name, spec, index, args, device, precision, channels_last))
        except (RuntimeError, SwavFastError, ImportError) as exc:
            log.warning("loader %s failed: %s", name, short_error(exc))
            rows.append({"loader": name, "note": short_error(exc)})
        reset_memory(device)
    result: dict[str, Any] = {
        "benchmark": "e2e", "env": env_info(device),
        "command": "python3 benchmarks/bench_e2e.py " + shlex.join(args.argv),
        "config": {"device": str(device), "data": str(root), "images": len(index), "mode": args.mode,
                   "precision": precision, "channels_last": channels_last, "arch": args.arch,
                   "batch": args.batch, "crops": [list(c) for c in crops], "steps": args.steps,
                   "warmup": args.warmup, "sync_each_step": args.sync, "prototypes": args.prototypes,
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
