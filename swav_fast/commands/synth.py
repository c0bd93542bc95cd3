"""``swav-fast synth``: write the built-in synthetic, photo-like ImageFolder dataset."""
from __future__ import annotations

import argparse
import re
import time

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)`` (width, height); an argparse type."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected WIDTHxHEIGHT, e.g. 500x375")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 8 or h < 8 or w > 16384 or h > 16384:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: width and height must be in 8..16384")
    return w, h


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _quality(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be in 1..100, got {value}")
    return value


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic photo-like ImageFolder dataset",
        description=(
            "Render a synthetic, photo-like ImageFolder dataset (OUT/class_000/img_00000000.jpg, ...) "
            "plus OUT/manifest.json. Classes are shape/texture families that survive cropping, "
            "colour jitter and grayscale; colours, poses and lighting are random per image. Output "
            "is deterministic for a seed, whatever the number of workers. Re-running with the same "
            "parameters reuses the existing dataset."
        ),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--images", type=_int_at_least(1), default=1000, metavar="N",
                        help="number of images (default: %(default)s)")
    parser.add_argument("--classes", type=_int_at_least(2), default=10, metavar="C",
                        help="number of classes, balanced round-robin (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default=(500, 375), metavar="WxH",
                        help="image width x height in pixels (default: 500x375)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                        help="random seed (default: %(default)s)")
    parser.add_argument("--quality", type=_quality, default=90, metavar="Q",
                        help="JPEG quality 1..100 (default: %(default)s)")
    parser.add_argument("--workers", type=_int_at_least(0), default=0, metavar="W",
                        help="worker processes; 0 = all cores, 1 = in-process (default: %(default)s)")
    parser.add_argument("--kind", choices=["photo", "shapes"], default="photo",
                        help="photo: shape + texture families, colours random; shapes: one object whose "
                             "shape is the class, all colours random, at most 14 classes (default: photo)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from swav_fast.data.synthetic import generate_synthetic

    start = time.perf_counter()
    manifest = generate_synthetic(
        args.out,
        num_images=args.images,
        num_classes=args.classes,
        size=args.size,
        seed=args.seed,
        quality=args.quality,
        workers=args.workers,
        progress=not args.no_progress,
        kind=args.kind,
    )
    seconds = time.perf_counter() - start
    mean_kb = manifest["total_bytes"] / max(1, manifest["num_images"]) / 1024.0
    w, h = manifest["size"]
    print(f"synth: {manifest['num_images']} images, {manifest['num_classes']} classes, {w}x{h}, "
          f"mean {mean_kb:.1f} KB, {seconds:.2f} s -> {args.out}")
    return 0
