"""JPEG decode images/s of TorchCodec, torchvision.io, nvImageCodec and PIL on the same JPEGs, as ratios.

    python3 benchmarks/bench_decode.py [--data DIR | --size 500x375] [--images 64] [--batch 32]
        [--decoders torchcodec,torchvision,nvimgcodec,pil] [--repeats 5] [--device cpu|cuda] [--json out.json]

(also ``swav-fast bench decode ...``). Every decoder decodes the same encoded JPEGs (an ImageFolder's
first ``--images`` JPEGs, or synthetic photo-like ones of ``--size`` at quality 90) into ``[3, H, W]``
uint8 RGB on ``--device``: ``torchcodec``, ``torchvision`` and ``nvimgcodec`` through
:func:`pipelines.decode.decode_jpegs` in batched calls of ``--batch`` (nvJPEG on CUDA); ``pil``
image by image (``Image.open(...).convert("RGB")``, then a tensor, moved to the device on CUDA: the
PIL backend's decode).  A pass decodes every image once; the figure is images / the median pass
time after ``--warmup`` passes, the decoders' passes alternating (so that the load of a shared machine
reaches all alike).  ``x_pil`` and ``x_torchvision`` are the ratios to those decoders' images/s
in the same run; ``max_diff`` is the largest pixel difference from PIL's decode (JPEG decoders may
round differently by a few levels).  A decoder that cannot run here is a row with the reason.
"""
from __future__ import annotations

import argparse
import io
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_step import resolve_device, short_error
from benchmarks.common import benchmark_main, env_info, parse_with_common, synchronize
from pipelines.decode import decode_jpegs, decoder_status
from swav_fast.errors import ConfigError

DECODERS = ("torchcodec", "torchvision", "nvimgcodec", "pil")
COLUMNS = [("decoder", "decoder"), ("device", "device"), ("images", "images"), ("batch", "batch"),
           ("images_per_s", "images/s"), ("x_pil", "x pil"), ("x_torchvision", "x torchvision"),
           ("max_diff", "max diff"), ("note", "note")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="an ImageFolder (its first --images JPEGs); default synthetic")
    p.add_argument("--size", default="500x375", help="synthetic images' WxH (default 500x375, ImageNet-like)")
    p.add_argument("--images", type=int, default=64, help="JPEGs decoded per pass")
    p.add_argument("--batch", type=int, default=32, help="images per batched decode call")
    p.add_argument("--decoders", default=",".join(DECODERS),
                   help=f"comma-separated, of {', '.join(DECODERS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed passes (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--seed", type=int, default=0)
    args = parse_with_common(p, argv)
    for name in ("images", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    args.decoder_list = [d.strip() for d in args.decoders.split(",") if d.strip()]
    unknown = [d for d in args.decoder_list if d not in DECODERS]
    if unknown or not args.decoder_list:
        raise ConfigError(f"--decoders: unknown {', '.join(unknown) or '(none)'}; "
                          f"valid: {', '.join(DECODERS)}")
    return args


def photo_jpeg(w: int, h: int, rng: np.random.Generator) -> bytes:
    """A smooth colour image with texture and noise (JPEG-compressible like a photo), quality 90."""
    y, x = np.mgrid[0:h, 0:w]
    img = rng.uniform(40, 215, 3) + 40 * np.sin(x[..., None] / rng.uniform(3, 30, 3) + rng.uniform(0, 6, 3)) \
        + 30 * np.cos(y[..., None] / rng.uniform(4, 40, 3)) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def load_jpegs(args: argparse.Namespace) -> tuple[list[bytes], str]:
    """The encoded JPEGs every decoder decodes, and where they came from."""
    if args.data:
        from pipelines import scan_image_folder

        index = scan_image_folder(args.data)
        out = []
        for i in range(len(index)):
            data = Path(index.path(i)).read_bytes()
            if data[:3] == b"\xff\xd8\xff":
                out.append(data)
            if len(out) == args.images:
                break
        if not out:
            raise ConfigError(f"--data {args.data}: no JPEG files")
        return out, f"{len(out)} JPEGs of {args.data}"
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected WxH, got {args.size!r}") from None
    rng = np.random.default_rng(args.seed)
    return [photo_jpeg(w, h, rng) for _ in range(args.images)], f"{args.images} synthetic {w}x{h} JPEGs (q90)"


def pil_decode(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    out = []
    for d in datas:
        img = torch.from_numpy(np.array(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1)
        out.append(img.to(device, non_blocking=True) if device.type == "cuda" else img)
    return out


def decode_pass(decoder: str, datas: Sequence[bytes], batch: int, device: torch.device
                ) -> Callable[[], list[torch.Tensor]]:
    """One pass over ``datas`` with ``decoder``, in batched calls of ``batch``."""
    def run() -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(datas), batch):
            chunk = datas[start:start + batch]
            out += pil_decode(chunk, device) if decoder == "pil" else decode_jpegs(chunk, device, decoder)
        return out
    return run


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int
            ) -> dict[str, float]:
    """Median seconds of a pass per decoder; the passes of the decoders alternate (round-robin), so a
    change of load on a shared machine reaches every decoder alike; the device is synchronised around
    each pass."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    datas, source = load_jpegs(args)
    status = decoder_status()
    reference = pil_decode(datas, torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], Any]] = {}
    for decoder in args.decoder_list:
        row: dict[str, Any] = {"decoder": decoder, "device": str(device), "images": len(datas),
                               "batch": 1 if decoder == "pil" else args.batch}
        rows.append(row)
        why = status.get(decoder)
        if why is not None:
            row["note"] = f"not usable here: {why}"[:160]
            continue
        try:
            fn = decode_pass(decoder, datas, args.batch, device)
            images = fn()
            row["max_diff"] = max(int((a.cpu().int() - b.int()).abs().max())
                                  for a, b in zip(images, reference))
            fns[decoder] = fn
        except Exception as exc:  # noqa: BLE001 - one failing decoder is a row, not a crash
            row["note"] = short_error(exc)
    seconds = measure(fns, device, args.repeats, args.warmup)
    for row in rows:
        if row["decoder"] in seconds:
            row.update(images_per_s=len(datas) / seconds[row["decoder"]], pass_s=seconds[row["decoder"]])
    speed = {r["decoder"]: r.get("images_per_s") for r in rows}
    for r in rows:
        if r.get("images_per_s"):
            for base in ("pil", "torchvision"):
                if speed.get(base):
                    r[f"x_{base}"] = r["images_per_s"] / speed[base]
    return {
        "benchmark": "decode", "env": env_info(device),
        "command": "python3 benchmarks/bench_decode.py " + shlex.join(args.argv),
        "config": {"device": str(device), "source": source, "images": len(datas), "batch": args.batch,
                   "repeats": args.repeats, "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
                   "mean_kb": round(sum(map(len, datas)) / len(datas) / 1024, 1),
                   "torchcodec": _version("torchcodec"), "nvimgcodec": _version("nvidia.nvimgcodec")},
        "results": rows,
    }


def _version(module: str) -> str | None:
    try:
        return str(getattr(__import__(module, fromlist=["_"]), "__version__", "?"))
    except Exception:  # noqa: BLE001 - not installed / not loadable
        return None


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"JPEG decode on {result['env'].get('gpu', 'cpu')}: {cfg['source']} ({cfg['mean_kb']} KB mean), "
            f"batches of {cfg['batch']}, median of {cfg['repeats']} passes, {cfg['torch_threads']} torch "
            f"thread(s); torchcodec {cfg['torchcodec']}, nvimgcodec {cfg['nvimgcodec']}")


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
