"""Training-step throughput (images/s) of every method of the family on the same trunk and crops.

    python3 benchmarks/bench_methods.py [--methods swav,simclr,...] [--variants eager:bf16]
        [--arch resnet50] [--batch 128] [--crops 2x224,6x96] [--heads paper|same] [--steps 10]
        [--warmup 2] [--json out.json]

(also ``swav-fast bench methods ...``). Each method is built exactly as ``swav-fast train --method
NAME`` builds it (:func:`swav_fast.methods.build_method` from a config, the trainer's optimiser) and
driven by the trainer's :class:`~swav_fast.step.TrainStep`, so a row is the step a real run takes:
forward of every view, the method's heads, target network or memory, loss, backward, optimiser and
the method's after-update work (EMA, bank, prototype re-normalisation). ``--heads paper`` gives each
method its paper's projector (e.g. BYOL 4096-256, Barlow Twins 8192-8192, DINO 2048-256 -> 65,536);
``--heads same`` gives every method ``--hidden-dim``/``--feat-dim``. Methods that take only the global
crops from the target side (BYOL, MoCo v3, DINO) still run the online network on every crop. Freezes
that would cover the timed steps (SwAV's prototypes, DINO's last layer) are shortened to the first
step. ``x first`` is each row's images/s over the first method's in the same variant. The defaults
(eager bf16, 10 timed steps after 2) fit a short slice of GPU time: nine compiled variants would spend
most of it compiling (``--variants compile:bf16`` for those, compile time reported separately).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_step import (input_dtype, parse_crops, parse_variants, peak_memory_gib, reset_memory,
                                   resolve_device, short_error, synthetic_views, time_note, time_split,
                                   time_steps)
from benchmarks.common import benchmark_main, env_info, parse_with_common
from swav_fast.config import Config, load_config
from swav_fast.errors import ConfigError, SwavFastError
from swav_fast.methods import available_methods, build_method, method_info
from swav_fast.step import TrainStep
from swav_fast.run import build_optimizer

log = logging.getLogger("benchmarks")

#: (projector hidden width, output size) of each paper's ResNet-50 recipe, as each method declares it
#: (``register_method(..., heads=...)``; the default of ``model.hidden_dim`` / ``model.feat_dim``)
PAPER_HEADS = {name: method_info(name).heads for name in available_methods()}
COLUMNS = [("method", "method"), ("variant", "variant"), ("hidden_dim", "hidden"), ("feat_dim", "out"),
           ("images_per_s", "images/s"), ("ratio", "x first"), ("step_ms", "ms/step"),
           ("peak_mem_gib", "peak GiB"), ("compile_s", "compile s"), ("mode", "ran as"), ("note", "note")]


def bench_config(method: str, arch: str, batch: int, crops: list[tuple[int, int]], hidden_dim: int,
                 feat_dim: int) -> Config:
    """The config ``swav-fast train --method METHOD`` would run with these trunk, heads and crops."""
    sizes = [size for _, size in crops]
    extra = {
        "train": {"method": method},
        "model": {"arch": arch, "hidden_dim": hidden_dim, "feat_dim": feat_dim},
        "optim": {"batch_size": batch, "epochs": 1},
        "data": {"crops": {"num_crops": [count for count, _ in crops], "size_crops": sizes,
                           "min_scale_crops": [0.14] * len(sizes), "max_scale_crops": [1.0] * len(sizes)}},
        "methods": {"swav": {"freeze_prototypes_niters": 1, "queue_length": 0},
                    "dino": {"freeze_last_layer_epochs": 0}},
    }
    return load_config(extra=extra)


def parse_methods(text: str | None) -> list[str]:
    valid = available_methods()
    default = ["swav"] + [m for m in valid if m != "swav"]
    names = default if text is None else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in valid]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"valid: {', '.join(valid)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench methods", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help="comma-separated methods (default: all, swav first)")
    p.add_argument("--variants", help="comma-separated MODE:PRECISION (default eager:bf16 on CUDA, "
                                      "eager:fp32 on CPU)")
    p.add_argument("--arch", default=None, help="trunk (default resnet50 on CUDA, resnet10_half on CPU)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch size (default 128; 4 on CPU)")
    p.add_argument("--crops", default=None, help="COUNTxSIZE groups (default 2x224,6x96; 2x64,4x32 on CPU)")
    p.add_argument("--heads", choices=["paper", "same"], default="paper",
                   help="paper: each method's own projector sizes; same: --hidden-dim/--feat-dim for all")
    p.add_argument("--hidden-dim", type=int, default=2048)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--bank-size", type=int, default=None,
                   help="InstDisc memory-bank rows (default 1,281,167 = ImageNet on CUDA; 1000 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 on CPU)")
    return parse_with_common(p, argv)


def heads_of(method: str, args: argparse.Namespace) -> tuple[int, int]:
    if args.heads == "same":
        return args.hidden_dim, args.feat_dim
    if method not in PAPER_HEADS:
        raise ConfigError(f"--heads paper: no paper projector sizes for {method!r}; use --heads same")
    return PAPER_HEADS[method]


def bench_one(method_name: str, mode: str, precision: str, args: argparse.Namespace, device: torch.device,
              crops: list[tuple[int, int]]) -> dict[str, Any]:
    cuda = device.type == "cuda"
    channels_last = cuda and precision != "fp32"
    hidden_dim, feat_dim = heads_of(method_name, args)
    row: dict[str, Any] = {"method": method_name, "variant": f"{mode}:{precision}", "hidden_dim": hidden_dim,
                           "feat_dim": feat_dim, "channels_last": channels_last}
    total = args.warmup + args.steps
    cfg = bench_config(method_name, args.arch, args.batch, crops, hidden_dim, feat_dim)
    torch.manual_seed(0)
    method = build_method(method_name, cfg)
    method.on_train_start(args.bank_size, total)
    method = method.to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    method.on_epoch_start(0)
    optimizer = build_optimizer(cfg, method.trainable())
    options = {"backend": args.compile_backend} if args.compile_backend else None
    step = TrainStep(method, optimizer, device, precision, channels_last, mode=mode, compile_options=options)
    dtype = input_dtype(precision, device)
    inputs = [synthetic_views(crops, args.batch, device, dtype, channels_last, seed) for seed in (1, 2)]
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(args.bank_size, (args.batch,), generator=g) for _ in range(2)]
    loss, first_step_s, seconds = time_steps(step, inputs, 0.1, args.warmup, args.steps, device, indices)
    stats = step.stats
    row.update(images_per_s=args.steps * args.batch / seconds, step_ms=1e3 * seconds / args.steps,
               peak_mem_gib=peak_memory_gib(device), first_step_s=first_step_s, compile_s=stats.compile_s,
               mode=stats.mode, fallback_reason=stats.fallback_reason, loss=loss)
    if stats.fallback_reason:
        row["note"] = f"fell back: {stats.fallback_reason}"[:80]
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    methods = parse_methods(args.methods)
    variants = parse_variants(args.variants or ("eager:bf16" if cuda else "eager:fp32"), device)
    if any(mode == "plain-compile" for mode, _ in variants):
        raise ConfigError("--variants: plain-compile is a SwAV-only baseline (benchmarks/bench_step.py)")
    args.arch = args.arch or ("resnet50" if cuda else "resnet10_half")
    args.batch = args.batch or (128 if cuda else 4)
    args.bank_size = args.bank_size or (1_281_167 if cuda else 1000)
    crops = parse_crops(args.crops or ("2x224,6x96" if cuda else "2x64,4x32"))
    args.steps = args.steps if args.steps is not None else (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    if args.steps < 1 or args.warmup < 1 or args.batch < 2 or args.bank_size < args.batch:
        raise ConfigError("--steps and --warmup must be >= 1, --batch >= 2, --bank-size >= --batch")
    started = time.perf_counter()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    for mode, precision in variants:
        first = None
        for name in methods:
            reset_memory(device)
            try:
                row = bench_one(name, mode, precision, args, device, crops)
                first = first or row["images_per_s"]
                row["ratio"] = row["images_per_s"] / first
            except (RuntimeError, SwavFastError) as exc:  # e.g. out of memory: a row says so
                log.warning("%s %s:%s failed: %s", name, mode, precision, short_error(exc))
                row = {"method": name, "variant": f"{mode}:{precision}", "note": short_error(exc)}
            rows.append(row)
        reset_memory(device)
    return {
        "benchmark": "methods", "env": env_info(device), **time_split(rows, started),
        "command": "python3 benchmarks/bench_methods.py " + shlex.join(args.argv),
        "config": {"device": str(device), "crops": [list(c) for c in crops], "arch": args.arch,
                   "batch": args.batch, "methods": methods, "variants": [f"{m}:{p}" for m, p in variants],
                   "heads": args.heads, "bank_size": args.bank_size, "steps": args.steps,
                   "warmup": args.warmup, "compile_backend": args.compile_backend or "inductor"},
        "results": rows,
    }


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"method step benchmark on {result['env'].get('gpu', 'cpu')}: {cfg['arch']}, "
            f"batch {cfg['batch']}, crops {'+'.join(f'{c}x{s}' for c, s in cfg['crops'])}, "
            f"{cfg['heads']} heads, {cfg['steps']} timed steps after {cfg['warmup']}; {time_note(result)}")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
