"""``swav-fast prepare``: convert an ImageFolder or the ImageNet archives into TFRecord / webdataset /
FFCV beton shards."""

from __future__ import annotations

import argparse
import time
from collections import Counter

EPILOG = """output: OUT/<split>/ holds the shards, their DALI index files (.idx) and manifest.json
(counts per class, class-to-index map, shard list with sizes and SHA-256, bad files with reasons).
  tfrecord: <split>-00000.tfrecord (tf.train.Example: image/encoded, image/class/label, image/index)
  wds:      <split>-00000.tar (<key>.jpg + <key>.cls), index in DALI's wds2idx format
  beton:    <split>.beton (FFCV fields image + label); FFCV's crop decoder allocates
            batch x max height x max width x 3 bytes per view, so use --max-resolution (e.g. 512)
Images are stored as RGB JPEG: valid RGB JPEGs pass through byte for byte unless --quality is
given; CMYK, grayscale, PNG (also when named .jpg), EXIF-rotated and oversized files are converted.
Bad files (empty, truncated, not an image, unreadable) are skipped and listed. Shards are written
to a temp name and renamed when complete: rerunning an interrupted command skips finished shards
and gives the same bytes as an uninterrupted run. Check the result with 'swav-fast inspect OUT'.

sources (--src): an ImageFolder; ILSVRC2012_img_train.tar (a tar of per-class tars, read in place:
nothing is extracted; classes = inner tar names, sorted, as the extracted folder gives); or the flat
ILSVRC2012_img_val.tar / a folder of its JPEGs with --labels: the devkit's
ILSVRC2012_validation_ground_truth.txt (IDs mapped through the devkit's meta.mat next to it, needs
scipy, or --synsets), the devkit folder or ILSVRC2012_devkit_t12.tar.gz, or LOC_val_solution.csv.
ImageNet from the official archives:
  swav-fast prepare --src ILSVRC2012_img_train.tar --format wds --out /data/in1k
  swav-fast prepare --src ILSVRC2012_img_val.tar --labels ILSVRC2012_devkit_t12.tar.gz \\
      --split val --format wds --out /data/in1k
  add --classes imagenet100 (both commands) for ImageNet-100, --per-class 50 for a quick subset.

"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _quality(text: str) -> int | None:
    if text.lower() in ("keep", "passthrough", "pass-through", "none"):
        return None
    value = _positive(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be in 1..100, got {value}")
    return value


def _resolution(text: str) -> int | None:
    if text.lower() in ("none", "0"):
        return None
    value = _positive(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be >= 8 pixels, got {value}")
    return value


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="convert an ImageFolder into TFRecord / webdataset / FFCV shards",
        description="Convert an ImageFolder (SRC/<class>/<image>) into shards for the DALI and FFCV loaders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--src",
        required=True,
        metavar="SRC",
        help="an ImageFolder, ILSVRC2012_img_train.tar, or ILSVRC2012_img_val.tar / a folder of its "
        "images (with --labels)",
    )
    p.add_argument("--format", required=True, choices=("beton", "tfrecord", "wds"), help="output format")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder; the split goes to DIR/<split>/"
    )
    p.add_argument("--split", default="train", metavar="NAME", help="split name (default: %(default)s)")
    p.add_argument(
        "--val-src",
        metavar="IMAGEFOLDER",
        help="also prepare this ImageFolder as split 'val' with the same options",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="labels of a flat validation source: ILSVRC2012_validation_ground_truth.txt, the devkit "
        "folder or .tar.gz, or LOC_val_solution.csv (with --val-src: for the --val-src source)",
    )
    p.add_argument(
        "--synsets",
        metavar="FILE",
        help="synsets in devkit order (line k = ILSVRC2012 ID k) for ground-truth IDs, instead of meta.mat",
    )
    p.add_argument(
        "--classes",
        metavar="FILE|imagenet100",
        help="keep only these classes (one per line; 'imagenet100': the CMC / solo-learn ImageNet-100 "
        "list), indexed in sorted order",
    )
    p.add_argument(
        "--per-class",
        type=_positive,
        metavar="N",
        help="keep the first N images of each class (sorted by file name)",
    )
    p.add_argument(
        "--shard-size",
        type=_positive,
        default=1000,
        metavar="N",
        help="source images per shard (default: %(default)s); beton: resume granularity",
    )
    p.add_argument(
        "--max-resolution",
        type=_resolution,
        default=None,
        metavar="PX",
        help="resize so the long side is at most PX, keeping the aspect ratio (default: no resize)",
    )
    p.add_argument(
        "--quality",
        type=_quality,
        default=None,
        metavar="Q",
        help="re-encode every image at JPEG quality Q (1..100); default: pass valid RGB JPEGs "
        "through unchanged and re-encode the rest at 90",
    )
    p.add_argument(
        "--workers",
        type=_non_negative,
        default=0,
        metavar="W",
        help="decode/encode processes; 0 = all cores, 1 = in-process (default: %(default)s)",
    )
    p.add_argument(
        "--page-size-mb",
        type=_positive,
        default=8,
        metavar="MB",
        help="beton page size in MiB, a power of two >= 2 (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished dataset in OUT/<split> that was made with other settings",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from swav_fast.prepare import prepare_dataset

    labels = (args.labels, args.synsets)
    jobs = [(args.src, args.split, (None, None) if args.val_src else labels)]
    if args.val_src:
        if args.split == "val":
            from swav_fast.errors import ConfigError

            raise ConfigError("--val-src writes split 'val'; use another --split for --src")
        jobs.append((args.val_src, "val", labels))
    for src, split, (label_file, synsets) in jobs:
        start = time.perf_counter()
        m = prepare_dataset(
            src,
            args.out,
            args.format,
            split=split,
            shard_size=args.shard_size,
            max_resolution=args.max_resolution,
            quality=args.quality,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            page_size=args.page_size_mb << 20,
            labels=label_file,
            synsets=synsets,
            classes=args.classes,
            per_class=args.per_class,
        )
        seconds = time.perf_counter() - start
        bad = m["bad_files"]
        print(
            f"prepare {split}: {m['num_samples']} images in {len(m['shards'])} {m['format']} shard(s), "
            f"{m['total_bytes'] / 2**20:.1f} MiB, {m['num_passthrough']} passed through, "
            f"{m['num_reencoded']} re-encoded, {len(bad)} bad file(s) skipped, {seconds:.1f} s "
            f"-> {args.out}/{split}"
        )
        for b in bad[:20]:
            print(f"  bad: {b['path']}: {b['reason']}")
        if len(bad) > 20:
            print(f"  ... {len(bad) - 20} more in {args.out}/{split}/manifest.json (bad_files)")
        converted = Counter(c["reason"] for c in m.get("converted_files", []))
        for reason, n in sorted(converted.items()):
            print(f"  converted: {n} file(s): {reason} (listed in manifest.json, converted_files)")
        if m.get("subset"):
            sub = m["subset"]
            text = f"  subset: {sub['num_classes']} classes"
            text += f" from {sub['classes']}" if "classes" in sub else ""
            text += f", at most {sub['per_class']} images each" if sub.get("per_class") else ""
            print(text)
    return 0
