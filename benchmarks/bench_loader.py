"""Loader throughput per backend and stage: read, decode, augment, total (images/s), in one run.

    python -m benchmarks.bench_loader [--data DIR] [--backends pil,torch,dali] [--device cuda]
        [--batch-size 256] [--batches 10] [--warmup 2] [--workers N] [--step] [--json out.json]

(also ``swav-fast bench loader ...``).  Without ``--data`` it generates the built-in synthetic set
(ImageNet-like 500x375 JPEGs, ~80 KB) once into ``~/.cache/swav-fast/bench-loader-N``.  The spec is the
paper's 2x224 + 6x96 (bf16 channels-last on CUDA).

Stages, per backend:

* ``torch``: ``read`` = the loader's thread-pool file reads; ``decode`` = the batched
  ``decode_jpeg`` on pre-read bytes; ``augment`` = parameters + crop/resize/flip + colour/blur/normalise
  on pre-decoded images; ``total`` = iterating the loader (prefetching on its side stream).  On CUDA,
  ``gpu ms/img`` is the GPU time of decode + augment per image, from CUDA events around each batch's
  work (no profiler in the timed loop; an upper bound: it spans the batch's work on every stream),
  to compare with the training step's (``--step``).  ``--profile`` adds one separate profiled pass
  over the same batches: ``kernel ms/img`` is the summed kernel time, and the share of the step uses it.
* ``pil``: ``read``, ``decode`` (PIL) and ``augment`` (PIL crop/resize + torchvision ops) in this one
  process, i.e. *per worker*; ``total`` = the DataLoader with ``--workers`` processes.
* any other registered backend (``dali``, ``ffcv``): ``total``; stages too when its loader has a
  ``bench_stages(batches) -> {stage: seconds}`` method.

Workers: ``--workers N`` is each backend's parallelism: PIL worker processes, DALI CPU threads, FFCV
workers, the torch loader's file-reading threads. Its default is one per CPU core for ``pil``, ``dali``
and ``ffcv``, and the torch loader's own (``min(8, cores)`` read threads).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import benchmark_main, env_info, synchronize, timed
from pipelines import MultiCropSpec, available_backends, build_loader, scan_image_folder
from pipelines.folder import ImageFolderIndex
from swav_fast.config import load_config
from swav_fast.errors import SwavFastError

log = logging.getLogger("benchmarks")

#: Optional backend modules: importing one registers its backend.
BACKEND_MODULES = ("pipelines.torch_backend", "pipelines.dali_backend", "pipelines.ffcv_backend")
COLUMNS = [("backend", "backend"), ("device", "device"), ("read", "read img/s"), ("decode", "decode img/s"),
           ("augment", "augment img/s"), ("total", "total img/s"), ("gpu_ms_per_image", "gpu ms/img"),
           ("kernel_ms_per_image", "kernel ms/img"), ("note", "note")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench loader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageFolder to read (default: the built-in synthetic set)")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic images to generate (default: enough for warmup + batches)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every registered backend)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches per stage (default 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (compilation, caches)")
    p.add_argument("--workers", type=int, default=None,
                   help="each backend's workers: pil processes, dali / ffcv threads (default: one per "
                        "core), torch read threads (default: its own)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--step", action="store_true",
                   help="also time a SwAV ResNet-50 step (fwd+bwd, bf16, channels-last) per image")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: one extra profiled pass (summed kernel time of decode + augment)")
    p.add_argument("--recipe", default=None,
                   help="take the views and augmentations from this recipe's data.crops (e.g. quick: "
                        "2x48); default: the paper's 2x224+6x96")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="write the results here (JSON)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


# -- data ---------------------------------------------------------------------------------------------
def synthetic_folder(num_images: int, cache: str = "~/.cache/swav-fast") -> Path:
    """The built-in ImageNet-like synthetic set (500x375 JPEGs), generated once."""
    from swav_fast.data.synthetic import generate_synthetic

    root = Path(os.path.expanduser(cache)) / f"bench-loader-{num_images}"
    generate_synthetic(root, num_images=num_images, num_classes=10, size=(500, 375), seed=0, progress=False)
    return root


def mean_file_kb(index: ImageFolderIndex, limit: int = 512) -> float:
    sizes = [os.path.getsize(index.path(i)) for i in range(min(limit, len(index)))]
    return float(np.mean(sizes)) / 1024 if sizes else 0.0


# -- per-backend stages ---------------------------------------------------------------------------------
class GpuTimer:
    """GPU time of blocks of work on the current stream, from CUDA events (nothing on the CPU).

    ``with timer: work()`` records an event pair around ``work``; ``seconds()`` (after the device is
    synchronised) sums them. No profiler and no host synchronisation inside the timed loop."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pairs: list[tuple[Any, Any]] = []

    def __enter__(self) -> "GpuTimer":
        if self.cuda:
            self.pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pairs[-1][0].record()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.pairs[-1][1].record()

    def seconds(self) -> float | None:
        if not self.cuda:
            return None
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1e3


def profiled_kernel_seconds(fn: Any, device: torch.device) -> float | None:
    """Summed CUDA kernel time of ``fn()`` in one profiler session (None without CUDA or CUPTI)."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
        us = sum(e.self_device_time_total for e in prof.key_averages())
        return us / 1e6 if us > 0 else None
    except Exception as e:  # noqa: BLE001 - CUPTI missing etc.: no kernel figure
        log.warning("CUDA profiler unavailable (%s); no kernel ms/img", e)
        return None


def torch_stages(index: ImageFolderIndex, spec: MultiCropSpec, args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    from pipelines.torch_backend import TorchLoader

    ld = TorchLoader(index, spec, args.batch_size, device=device, seed=args.seed,
                     num_workers=workers("torch", args))
    batches = ld.batch_indices(0)[: args.warmup + args.batches]
    timed_b = batches[args.warmup:]
    n_img = sum(len(b) for b in timed_b)
    try:
        for k, idx in enumerate(batches[: args.warmup]):  # compile, cuDNN / cuBLAS / nvJPEG warm-up
            dec = ld.decode(idx, ld.read(idx))
            ld.augment(dec.images, ld.params(0, k, dec))
        synchronize(device)
        datas, t_read = [], 0.0
        for idx in timed_b:
            d, t = timed(lambda: ld.read(idx), "cpu")
            datas.append(d)
            t_read += t
        gpu = GpuTimer(device)
        decs, t_dec = [], 0.0
        for idx, d in zip(timed_b, datas):
            with gpu:
                dec, t = timed(lambda: ld.decode(idx, d), device)
            decs.append(dec)
            t_dec += t
        params = [ld.params(0, args.warmup + k, dec) for k, dec in enumerate(decs)]
        synchronize(device)
        t_aug = 0.0
        for dec, prm in zip(decs, params):
            with gpu:
                _, t = timed(lambda: ld.augment(dec.images, prm), device)
            t_aug += t
        synchronize(device)
        gpu_s = gpu.seconds()
        kernel_s = None
        if args.profile:  # one separate profiled pass over the same batches
            def work() -> None:
                for idx, d, prm in zip(timed_b, datas, params):
                    ld.augment(ld.decode(idx, d).images, prm)
            kernel_s = profiled_kernel_seconds(work, device)
        del decs
        ld.set_epoch(0)
        it = iter(ld)
        for _ in range(args.warmup):
            next(it)
        synchronize(device)
        t0 = time.perf_counter()
        got = 0
        for _ in range(len(timed_b)):
            got += len(next(it))
        synchronize(device)
        t_total = time.perf_counter() - t0
        it.close()  # type: ignore[attr-defined]
    finally:
        ld.close()
    return {"read": n_img / t_read, "decode": n_img / t_dec, "augment": n_img / t_aug, "total": got / t_total,
            "gpu_ms_per_image": 1e3 * gpu_s / n_img if gpu_s is not None else None,
            "kernel_ms_per_image": 1e3 * kernel_s / n_img if kernel_s is not None else None,
            "note": f"{ld.read_threads} read threads"}


def pil_stages(index: ImageFolderIndex, spec: MultiCropSpec, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (several threads make the per-view ops slower)
    try:
        stages = _pil_worker_stages(index, spec, args)
    finally:
        torch.set_num_threads(threads)
    ratio = stages.pop("fetch_ratio")
    total = total_throughput("pil", index, spec, args, device)
    return {**stages, "total": total, "gpu_ms_per_image": None,
            "note": f"stages in one 1-thread process; batched fetch {ratio:.2f}x per-sample; "
                    f"total with {workers('pil', args)} workers"}


def _pil_worker_stages(index: ImageFolderIndex, spec: MultiCropSpec, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.params import sample_params
    from pipelines.pil import PILMultiCropDataset, augment_view, decode_rgb

    n_stage = max(8, min(64, args.batch_size))  # single-process stages: a smaller sample is enough
    ids = list(range(min(n_stage, len(index))))
    paths = [index.path(i) for i in ids]
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs = [decode_rgb(p) for p in paths]
    t_dec = time.perf_counter() - t0
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    t0 = time.perf_counter()
    for i, img in zip(ids, imgs):
        for p in sample_params(spec, args.seed, 0, i, img.width, img.height):
            augment_view(img, p, mean, std)
    t_aug = time.perf_counter() - t0
    # one worker's fetch of a batch as the loader does it (the parameters of the batch drawn in one
    # call) against one sample at a time: the same bits, the ratio is what drawing per batch buys
    # (CPU time of this one-thread process, interleaved, the best of three each: the ratio should not
    # depend on what else the machine runs)
    ds = PILMultiCropDataset(index, spec, seed=args.seed)
    t_one = t_many = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for i in ids:
            ds.load(i)
        t_one = min(t_one, time.process_time() - t0)
        t0 = time.process_time()
        ds.load_many(ids)
        t_many = min(t_many, time.process_time() - t0)
    return {"read": len(ids) / t_read, "decode": len(ids) / t_dec, "augment": len(ids) / t_aug,
            "fetch_per_sample": len(ids) / t_one, "fetch_batched": len(ids) / t_many, "fetch_ratio": t_one / t_many}


def workers(backend: str, args: argparse.Namespace) -> int:
    """``--workers``, else one per CPU core (PIL processes, DALI / FFCV threads); the torch loader's own
    default (0: ``min(8, cores)`` read threads)."""
    if args.workers is not None:
        return int(args.workers)
    return 0 if backend == "torch" else (os.cpu_count() or 1)


def total_throughput(backend: str, index: ImageFolderIndex, spec: MultiCropSpec, args: argparse.Namespace,
                     device: torch.device, stages: dict[str, Any] | None = None) -> float:
    """Images/s iterating ``backend``'s loader for ``--batches`` batches after ``--warmup``."""
    ld = build_loader(index, spec, args.batch_size, backend=backend, device=device, seed=args.seed,
                      num_workers=workers(backend, args))
    try:
        if stages is not None and hasattr(ld, "bench_stages"):
            times = ld.bench_stages(ld.batch_indices(0)[args.warmup: args.warmup + args.batches])
            n = sum(len(b) for b in ld.batch_indices(0)[args.warmup: args.warmup + args.batches])
            stages.update({k: n / v for k, v in times.items() if v > 0})
        it = iter(ld)
        for _ in range(args.warmup):
            next(it)
        synchronize(device)
        t0 = time.perf_counter()
        got = 0
        for _ in range(args.batches):
            got += len(next(it))
        synchronize(device)
        return got / (time.perf_counter() - t0)
    finally:
        ld.close()


def step_ms_per_image(spec: MultiCropSpec, batch_size: int, device: torch.device, iters: int = 10) -> float:
    """GPU time per image of a SwAV-style ResNet-50 step on the multi-crop shapes (trunk per resolution,
    bf16 autocast, channels-last, SGD), in milliseconds (CUDA events)."""
    import torchvision

    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    views = [torch.randn(batch_size * c, 3, s, s, device=device).to(memory_format=torch.channels_last)
             for s, c in spec.resolution_groups]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(model(v).float().pow(2).mean() for v in views)
        loss.backward()  # type: ignore[union-attr]
        opt.step()

    for _ in range(3):
        step()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return 1e3 * (time.perf_counter() - t0) / (iters * batch_size)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    synchronize(device)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    synchronize(device)
    return start.elapsed_time(end) / (iters * batch_size)


# -- main ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.batches = args.batches or (10 if cuda else 3)
    if args.batch_size < 1 or args.batches < 1 or args.warmup < 0:
        raise SystemExit("bench loader: --batch-size and --batches must be >= 1, --warmup >= 0")
    for name in BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            log.info("backend module %s not importable: %s", name, e)
    wanted = args.backends.split(",") if args.backends else available_backends()
    need = args.batch_size * (args.warmup + args.batches)
    root = Path(args.data) if args.data else synthetic_folder(args.images or need)
    index = scan_image_folder(root)
    if len(index) < need:
        raise SystemExit(f"bench loader: {root} has {len(index)} images; need {need} "
                         f"(batch {args.batch_size} x (warmup {args.warmup} + batches {args.batches}))")
    crops = load_config(args.recipe).data.crops if args.recipe else MultiCropSpec()
    spec = crops.replace(dtype=args.dtype or ("bfloat16" if cuda else "float32"), channels_last=cuda)
    rows: list[dict[str, Any]] = []
    for backend in wanted:
        row: dict[str, Any] = {"backend": backend, "device": str(device), "workers": workers(backend, args)}
        try:
            if backend == "torch":
                row.update(torch_stages(index, spec, args, device))
            elif backend == "pil":
                row.update(pil_stages(index, spec, args, device))
            else:
                stages: dict[str, Any] = {}
                row["total"] = total_throughput(backend, index, spec, args, device, stages)
                row.update(stages)
                row.setdefault("note", f"{row['workers']} {'threads' if backend == 'dali' else 'workers'}")
        except (SwavFastError, ImportError, RuntimeError, KeyError) as e:
            row["note"] = f"unavailable: {type(e).__name__}: {' '.join(str(e).split())}"  # whole message
        rows.append(row)
    result: dict[str, Any] = {
        "benchmark": "loader", "env": env_info(device),
        "command": "python3 benchmarks/bench_loader.py " + shlex.join(args.argv),
        "config": {"data": str(root), "images": len(index), "mean_file_kb": round(mean_file_kb(index), 1),
                   "batch_size": args.batch_size, "batches": args.batches, "warmup": args.warmup,
                   "workers": args.workers, "spec": spec.to_dict()},
        "results": rows,
    }
    if args.step:
        ms = step_ms_per_image(spec, args.batch_size, device)
        result["step_ms_per_image"] = ms
        for r in rows:
            loader_ms = r.get("kernel_ms_per_image") or r.get("gpu_ms_per_image")
            if loader_ms:
                r["gpu_fraction_of_step"] = loader_ms / ms
    return result


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"loader benchmark: {cfg['images']} images ({cfg['mean_file_kb']} KB mean) from {cfg['data']}, "
            f"batch {cfg['batch_size']}, {cfg['batches']} timed batches, views "
            f"{'+'.join(f'{c}x{s}' for s, c in MultiCropSpec().resolution_groups)}, "
            f"{result['env'].get('gpu', 'cpu')}")


def after_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Each GPU backend's decode + augment time as a share of the SwAV step's (``--step``)."""
    if "step_ms_per_image" in result:
        shares = ", ".join(f"{r['backend']} {100 * r['gpu_fraction_of_step']:.1f}%" for r in result["results"]
                           if "gpu_fraction_of_step" in r)
        print(f"ResNet-50 SwAV step: {result['step_ms_per_image']:.3f} GPU ms/img; loader share: {shares}")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS, after_table)


if __name__ == "__main__":
    sys.exit(main())
