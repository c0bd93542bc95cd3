"""Training-step throughput (images/s) on synthetic on-device crops, per step mode, arch and batch size.

    python3 benchmarks/bench_step.py [--variants eager:bf16,compile:bf16,graph:bf16]
        [--arch resnet50] [--batch 128] [--crops 2x224,6x96] [--steps 20] [--warmup 3] [--json out.json]

(also ``swav-fast bench step ...``). Every variant is ``MODE:PRECISION``; MODE is a step mode
(``eager``, ``compile``, ``graph``) or ``plain-compile`` (``torch.compile`` of the eager forward and
eager loss functions, the baseline the fused loss is measured against). Channels-last is on for
bf16/fp16 on CUDA and off for fp32 there, and on for the CPU (the trainer's defaults), unless
``--channels-last on|off``; ``--channels-last both`` runs every variant in both layouts (the
``ch-last`` column tells them apart; e.g. ``--device cpu --channels-last both`` for the CPU's NHWC
gain). The step is the full SwAV step of the trainer (trunk once per resolution, projection head,
3000 prototypes, Sinkhorn, swapped loss, backward, LARS, prototype re-normalisation, NaN guard).
Inputs are two pre-made batches of random crops on the device, used alternately (so graph mode
copies its inputs as in training). Reported:
images/s and ms per step over ``--steps`` timed steps after ``--warmup`` untimed ones, peak GPU memory,
the first step's time and, separately, compilation (first compiled step) and capture time; the
headline gives the whole run's wall time and how much of it was compilation. The defaults (three bf16
variants, 20 timed steps after 3) fit a short slice of GPU time; the fp32 and ``plain-compile``
baselines are one ``--variants`` away.
"""
from __future__ import annotations

import argparse
import gc
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import benchmark_main, env_info, parse_with_common, synchronize
from swav_fast.errors import ConfigError, SwavFastError
from swav_fast.methods.swav import SwAVMethod, SwAVObjective
from swav_fast.models import SwAVModel
from swav_fast.optim import LARS, lars_param_groups
from swav_fast.step import TrainStep

log = logging.getLogger("benchmarks")
STEP_MODES = ("eager", "compile", "graph", "plain-compile")
PRECISIONS = ("fp32", "bf16", "fp16")
COLUMNS = [("variant", "variant"), ("arch", "arch"), ("batch", "batch"), ("channels_last", "ch-last"),
           ("images_per_s", "images/s"), ("step_ms", "ms/step"), ("peak_mem_gib", "peak GiB"),
           ("first_step_s", "1st step s"), ("compile_s", "compile s"), ("capture_s", "capture s"),
           ("mode", "ran as"), ("note", "note")]


# -- shared with bench_e2e / bench_sinkhorn ----------------------------------------------------------
def parse_crops(text: str) -> list[tuple[int, int]]:
    """``"2x224,6x96"`` -> ``[(2, 224), (6, 96)]`` (count x size per crop group, globals first)."""
    groups = []
    for part in text.split(","):
        try:
            count, size = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--crops: {part!r} is not COUNTxSIZE (e.g. 2x224,6x96)") from None
        if count < 1 or size < 8:
            raise ConfigError(f"--crops: {part!r}: need count >= 1 and size >= 8")
        groups.append((count, size))
    if sum(c for c, _ in groups) < 2:
        raise ConfigError("--crops: SwAV needs at least 2 views")
    return groups


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{name}: values must be >= 1, got {text!r}")
    return values


def resolve_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available on this machine")
    return device


def build_swav(arch: str, num_views: int, device: torch.device, num_prototypes: int = 3000,
               hidden_dim: int = 2048, feat_dim: int = 128, queue_length: int = 0,
               channels_last: bool = False, seed: int = 0) -> tuple[SwAVMethod, LARS]:
    """A SwAV method (paper settings) and its LARS optimiser on ``device``."""
    torch.manual_seed(seed)
    model = SwAVModel(arch, hidden_dim, feat_dim, num_prototypes)
    objective = SwAVObjective(num_views, [0, 1], queue_length=queue_length, embed_dim=feat_dim)
    # frozen for iteration 0 only: the freeze machinery runs (as in a real run) but timed steps train them
    method = SwAVMethod(model, objective, freeze_prototypes_niters=1, epoch_queue_starts=0).to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    method.on_epoch_start(0)
    opt = LARS(lars_param_groups(method.model), lr=0.6, momentum=0.9, weight_decay=1e-6)
    return method, opt


def make_step(mode: str, method: SwAVMethod, opt: LARS, device: torch.device, precision: str,
              channels_last: bool, compile_backend: str | None = None) -> TrainStep:
    """A TrainStep in ``mode`` (``plain-compile``: compile mode over the eager loss functions)."""
    options = {"backend": compile_backend} if compile_backend else None
    step = TrainStep(method, opt, device, precision, channels_last,
                     mode="compile" if mode == "plain-compile" else mode, compile_options=options)
    if mode == "plain-compile":
        method.set_fused(False)
    return step


def input_dtype(precision: str, device: torch.device) -> torch.dtype:
    """What a loader would hand over: bf16/fp16 crops for mixed precision on CUDA, else float32."""
    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def synthetic_views(crops: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype,
                    channels_last: bool, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(batch, 3, size, size, generator=g).to(device, dtype).contiguous(memory_format=fmt)
            for count, size in crops for _ in range(count)]


def time_steps(step: TrainStep, inputs: list[list[torch.Tensor]], lr: float, warmup: int, steps: int,
               device: torch.device, indices: list[torch.Tensor] | None = None) -> tuple[float, float, float]:
    """``warmup`` untimed steps (the first one timed alone: compilation, capture), then ``steps`` timed
    ones, cycling through ``inputs`` (and ``indices``). Returns (last loss, first step s, timed s)."""
    def one(i: int) -> torch.Tensor:
        k = i % len(inputs)
        return step(inputs[k], lr, i, indices[k] if indices is not None else None)

    start = time.perf_counter()
    one(0)
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for i in range(1, warmup):
        one(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = one(i)
    synchronize(device)
    return float(loss), first_step_s, time.perf_counter() - start


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    """Free the last variant: compiled code (so each variant compiles afresh, and dynamo's per-function
    recompile limit is never reached across variants), cached blocks, the peak-memory counter."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_split(rows: list[dict[str, Any]], started: float) -> dict[str, float]:
    """The run's wall time and the part of it spent compiling and capturing (summed over rows)."""
    return {"wall_s": time.perf_counter() - started,
            "compile_total_s": sum(r.get("compile_s") or 0.0 for r in rows),
            "capture_total_s": sum(r.get("capture_s") or 0.0 for r in rows)}


def time_note(result: dict[str, Any]) -> str:
    return (f"{result['wall_s']:.0f} s wall, of which compilation {result['compile_total_s']:.0f} s "
            f"and capture {result['capture_total_s']:.1f} s")


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:160]


# -- this benchmark --------------------------------------------------------------------------------------
def parse_variants(text: str | None, device: torch.device) -> list[tuple[str, str]]:
    if text is None:
        text = ("eager:bf16,compile:bf16,graph:bf16" if device.type == "cuda"
                else "eager:fp32,compile:fp32,graph:fp32")
    out = []
    for part in text.split(","):
        mode, _, precision = part.partition(":")
        precision = precision or ("bf16" if device.type == "cuda" else "fp32")
        if mode not in STEP_MODES or precision not in PRECISIONS:
            raise ConfigError(f"--variants: {part!r} is not MODE:PRECISION with MODE in "
                              f"{', '.join(STEP_MODES)} and PRECISION in {', '.join(PRECISIONS)}")
        out.append((mode, precision))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", help="comma-separated MODE:PRECISION (default on CUDA: eager:bf16,"
                                      "compile:bf16,graph:bf16; on CPU: fp32 of each mode)")
    p.add_argument("--arch", default=None, help="comma-separated trunks (default resnet50 on CUDA, "
                                                "resnet10_half on CPU)")
    p.add_argument("--batch", default=None,
                   help="comma-separated per-GPU batch sizes (default 128; 4 on CPU)")
    p.add_argument("--crops", default=None, help="COUNTxSIZE groups (default 2x224,6x96; 2x64,4x32 on CPU)")
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--hidden-dim", type=int, default=2048)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--queue", type=int, default=0, help="queue length (0: none; used from the first step)")
    p.add_argument("--channels-last", choices=["auto", "on", "off", "both"], default="auto",
                   help="auto: on for bf16/fp16 on CUDA, off for fp32 there, on for the CPU; both: each "
                        "variant in both layouts")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 on CPU)")
    return parse_with_common(p, argv)


def layouts(choice: str, precision: str, device: torch.device) -> list[bool]:
    """The channels-last settings a variant runs with (``--channels-last``)."""
    if choice == "both":
        return [False, True]
    if choice == "auto":
        return [device.type != "cuda" or precision != "fp32"]
    return [choice == "on"]


def bench_one(mode: str, precision: str, arch: str, batch: int, args: argparse.Namespace,
              device: torch.device, crops: list[tuple[int, int]], channels_last: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": f"{mode}:{precision}", "arch": arch, "batch": batch,
                           "channels_last": channels_last, "precision": precision, "requested_mode": mode}
    reset_memory(device)
    num_views = sum(c for c, _ in crops)
    method, opt = build_swav(arch, num_views, device, args.prototypes, args.hidden_dim, args.feat_dim,
                             args.queue, channels_last)
    step = make_step(mode, method, opt, device, precision, channels_last, args.compile_backend)
    dtype = input_dtype(precision, device)
    inputs = [synthetic_views(crops, batch, device, dtype, channels_last, seed) for seed in (1, 2)]
    loss, row["first_step_s"], seconds = time_steps(step, inputs, 0.6, args.warmup, args.steps, device)
    stats = step.stats
    row.update(images_per_s=args.steps * batch / seconds, step_ms=1e3 * seconds / args.steps,
               peak_mem_gib=peak_memory_gib(device), compile_s=stats.compile_s, capture_s=stats.capture_s,
               mode=stats.mode, fallback_reason=stats.fallback_reason, captures=stats.captures,
               loss=loss, steps=args.steps, warmup=args.warmup)
    if stats.fallback_reason:
        row["note"] = f"fell back: {stats.fallback_reason}"[:80]
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    variants = parse_variants(args.variants, device)
    archs = (args.arch or ("resnet50" if cuda else "resnet10_half")).split(",")
    batches = int_list(args.batch or ("128" if cuda else "4"), "--batch")
    crops = parse_crops(args.crops or ("2x224,6x96" if cuda else "2x64,4x32"))
    args.steps = args.steps if args.steps is not None else (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.steps < 1 or args.warmup < 1:
        raise ConfigError("--steps and --warmup must be >= 1")
    started = time.perf_counter()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    for arch in archs:
        for batch in batches:
            for mode, precision in variants:
                for channels_last in layouts(args.channels_last, precision, device):
                    try:
                        rows.append(bench_one(mode, precision, arch, batch, args, device, crops,
                                              channels_last))
                    except (RuntimeError, SwavFastError) as exc:  # e.g. out of memory: a row says so
                        log.warning("%s:%s %s batch %d failed: %s", mode, precision, arch, batch,
                                    short_error(exc))
                        rows.append({"variant": f"{mode}:{precision}", "arch": arch, "batch": batch,
                                     "channels_last": channels_last, "note": short_error(exc)})
                    reset_memory(device)
    return {
        "benchmark": "step", "env": env_info(device), **time_split(rows, started),
        "command": "python3 benchmarks/bench_step.py " + shlex.join(args.argv),
        "config": {"device": str(device), "crops": [list(c) for c in crops], "archs": archs,
                   "batches": batches,
                   "variants": [f"{m}:{p}" for m, p in variants], "prototypes": args.prototypes,
                   "hidden_dim": args.hidden_dim, "feat_dim": args.feat_dim, "queue": args.queue,
                   "steps": args.steps, "warmup": args.warmup, "channels_last": args.channels_last,
                   "compile_backend": args.compile_backend or "inductor"},
        "results": rows,
    }


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"step benchmark on {result['env'].get('gpu', 'cpu')}: crops "
            f"{'+'.join(f'{c}x{s}' for c, s in cfg['crops'])}, {cfg['prototypes']} prototypes, "
            f"{cfg['steps']} timed steps after {cfg['warmup']}; {time_note(result)}")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
