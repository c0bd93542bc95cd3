"""Benchmark ``swav-fast prepare`` (images/s per format, worker count, pass-through vs re-encode) and
the loaders reading each format (images/s).

    python3 benchmarks/bench_prepare.py --images 2000 --workers 1,2 --json prepare.json
    python3 benchmarks/bench_prepare.py --tar-source --images 2000 --formats wds --json prepare-tar.json

``--tar-source``: pack the source into a tar of per-class tars (the ``ILSVRC2012_img_train.tar``
layout, cached beside the synthetic set) and time ``prepare`` reading it in place, with 1, 2 and
all cores (``--workers``, default ``1,2,0``; 0 = all), pass-through; indexing the archive is included.

Loaders: ``ffcv`` for beton (needs the ffcv extra), the registered ``dali`` backend for TFRecord /
webdataset when present (it is given the prepared split folder), and always a plain-Python
read + PIL decode baseline per format (single process), so every format gets a number.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from benchmarks.common import env_info, write_json  # noqa: E402
from pipelines.atomic import atomic_write  # noqa: E402
from swav_fast.prepare import FORMATS, prepare_dataset, read_manifest, shard_paths  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="synthetic images (default: %(default)s)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", default="500x375", help="synthetic image size WxH (default: %(default)s)")
    p.add_argument("--data", default=None, help="source ImageFolder (default: a cached synthetic set)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma list of formats")
    p.add_argument("--workers", default=None,
                   help="comma list of prepare worker counts, 0 = all cores "
                   "(default: 1,2; --tar-source: 1,2,0)")
    p.add_argument("--tar-source", action="store_true",
                   help="time prepare from a tar of per-class tars (ILSVRC2012_img_train.tar layout)")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--reencode-quality", type=int, default=90, help="quality of the re-encode runs")
    p.add_argument("--max-resolution", type=int, default=None, help="also applied in the re-encode runs")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch size")
    p.add_argument("--loader-workers", type=int, default=2, help="loader threads/workers")
    p.add_argument("--crops", default="2x224,6x96", help="multi-crop for the loaders, e.g. 2x224,6x96")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--keep", default=None, help="keep the prepared datasets in this folder")
    return p.parse_args(argv)


def source_folder(args: argparse.Namespace) -> Path:
    if args.data:
        return Path(args.data)
    from swav_fast.data.synthetic import generate_synthetic

    w, h = (int(v) for v in args.size.lower().split("x"))
    out = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "swav-fast"
        / f"bench-prepare-{args.images}-{args.classes}-{w}x{h}"
    )
    generate_synthetic(out, args.images, args.classes, (w, h), seed=0, workers=0, progress=False)
    return out


def pack_train_tar(src: Path, out: Path) -> Path:
    """``out``: a tar of per-class tars of the ImageFolder ``src`` (ILSVRC2012_img_train.tar layout)."""
    import tarfile

    if out.is_file():
        return out
    def write(raw) -> None:
        with tarfile.open(fileobj=raw, mode="w") as outer:
            for cls in sorted(d for d in src.iterdir() if d.is_dir()):
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as inner:
                    for f in sorted(cls.iterdir()):
                        inner.add(f, arcname=f.name)
                info = tarfile.TarInfo(f"{cls.name}.tar")
                info.size = buf.tell()
                buf.seek(0)
                outer.addfile(info, buf)

    atomic_write(out, write)  # a kill mid-way leaves no tar that looks complete
    return out


def bench_prepare_tar(src: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    archive = pack_train_tar(src, src.with_name(src.name + "-train.tar"))
    rows = []
    for fmt in args.formats.split(","):
        for w in _ints(args.workers):
            out = work / f"tar-{fmt}-{w}"
            start = time.perf_counter()
            m = prepare_dataset(archive, out, fmt, shard_size=args.shard_size, workers=w, progress=False)
            seconds = time.perf_counter() - start
            rows.append({"format": fmt, "source": m["source_kind"], "workers": w,
                         "cores_used": w or os.cpu_count(), "images": m["num_source_files"],
                         "seconds": round(seconds, 3),
                         "images_per_s": round(m["num_source_files"] / seconds, 1)})
            rate = rows[-1]["images_per_s"]
            print(f"prepare {fmt:8s} from tar    workers={w:<2d} {rate:8.1f} img/s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def bench_prepare(
    src: Path, work: Path, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    rows: list[dict[str, Any]] = []
    kept: dict[str, Path] = {}
    for fmt in args.formats.split(","):
        for mode in ("pass-through", "re-encode"):
            quality = None if mode == "pass-through" else args.reencode_quality
            max_res = None if mode == "pass-through" else args.max_resolution
            for w in _ints(args.workers):
                out = work / f"{fmt}-{mode}-{w}"
                start = time.perf_counter()
                m = prepare_dataset(
                    src,
                    out,
                    fmt,
                    shard_size=args.shard_size,
                    quality=quality,
                    max_resolution=max_res,
                    workers=w,
                    progress=False,
                )
                seconds = time.perf_counter() - start
                rows.append(
                    {
                        "format": fmt,
                        "mode": mode,
                        "workers": w,
                        "images": m["num_source_files"],
                        "seconds": round(seconds, 3),
                        "images_per_s": round(m["num_source_files"] / seconds, 1),
                        "mib": round(m["total_bytes"] / 2**20, 1),
                    }
                )
                print(
                    f"prepare {fmt:8s} {mode:12s} workers={w:<2d} {rows[-1]['images_per_s']:8.1f} img/s",
                    flush=True,
                )
                if mode == "pass-through" and fmt not in kept:
                    kept[fmt] = out / "train"
                else:
                    shutil.rmtree(out, ignore_errors=True)
    return rows, kept


def python_read_decode(split: Path) -> tuple[int, float]:
    """Images/s of reading every sample and decoding it with PIL, one process (a baseline)."""
    from pipelines.formats.beton import read_beton_tables
    from pipelines.formats.tfrecord import decode_example, iter_tfrecord_offsets, read_tfrecord_payload
    import tarfile

    m = read_manifest(split)
    n = 0
    start = time.perf_counter()
    for shard, _ in shard_paths(split, m):
        if m["format"] == "tfrecord":
            with open(shard, "rb") as f:
                for off, size in iter_tfrecord_offsets(f, os.path.getsize(shard)):
                    ex = decode_example(read_tfrecord_payload(f, off, size, check_crc=False))
                    Image.open(io.BytesIO(ex["image/encoded"][0])).convert("RGB")  # type: ignore[arg-type]
                    n += 1
        elif m["format"] == "wds":
            with tarfile.open(shard) as tar:
                for t in tar:
                    if t.name.endswith(".jpg"):
                        data = tar.extractfile(t).read()  # type: ignore[union-attr]
                        Image.open(io.BytesIO(data)).convert("RGB")
                        n += 1
        else:
            _, _, meta, alloc = read_beton_tables(shard)
            with open(shard, "rb") as f:
                for ptr, size in zip(alloc["ptr"].tolist(), alloc["size"].tolist()):
                    f.seek(ptr)
                    Image.open(io.BytesIO(f.read(size))).convert("RGB")
                    n += 1
    return n, time.perf_counter() - start


def bench_loaders(kept: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    from pipelines import MultiCropSpec, available_backends, build_loader

    groups = [g.split("x") for g in args.crops.split(",")]
    spec = MultiCropSpec(
        num_crops=[int(c) for c, _ in groups],
        size_crops=[int(s) for _, s in groups],
        min_scale_crops=[0.14, 0.05][: len(groups)] + [0.05] * max(0, len(groups) - 2),
        max_scale_crops=[1.0, 0.14][: len(groups)] + [0.14] * max(0, len(groups) - 2),
    )
    rows = []
    for fmt, split in kept.items():
        n, s = python_read_decode(split)
        rows.append({"format": fmt, "loader": "python+PIL (decode only)", "images_per_s": round(n / s, 1)})
        print(f"read    {fmt:8s} python+PIL decode        {rows[-1]['images_per_s']:8.1f} img/s", flush=True)
        backend, source = None, None
        if fmt == "beton":
            try:
                from pipelines.ffcv_backend import open_beton_index

                backend, source = "ffcv", open_beton_index(split)
            except Exception as exc:  # noqa: BLE001 - ffcv missing: report and continue
                rows.append({"format": fmt, "loader": "ffcv", "error": str(exc)})
        elif "dali" in available_backends():
            backend, source = "dali", split
        if backend is None:
            continue
        try:
            loader = build_loader(
                source, spec, args.batch_size, backend=backend, num_workers=args.loader_workers
            )
            it = iter(loader)
            next(it)  # compile / warm-up
            start, seen = time.perf_counter(), 0
            for b in it:
                seen += len(b)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "format": fmt,
                    "loader": backend,
                    "images_per_s": round(seen / max(seconds, 1e-9), 1),
                    "crops": args.crops,
                }
            )
            print(
                f"loader  {fmt:8s} {backend:24s} {rows[-1]['images_per_s']:8.1f} img/s ({args.crops})",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001
            rows.append({"format": fmt, "loader": backend, "error": f"{type(exc).__name__}: {exc}"})
            print(f"loader  {fmt:8s} {backend}: {exc}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers is None:
        args.workers = "1,2,0" if args.tar_source else "1,2"
    src = source_folder(args)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        if args.tar_source:
            rows = bench_prepare_tar(src, work, args)
        else:
            prep, kept = bench_prepare(src, work, args)
            loaders = bench_loaders(kept, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.tar_source:
        print("\n| source | format | workers (0 = all) | images/s |\n|---|---|---|---|")
        for r in rows:
            print(f"| tar of per-class tars | {r['format']} | {r['workers']} | {r['images_per_s']} |")
        return _write_result(args, argv, src, "prepare-tar", prepare_tar=rows)
    print("\n| format | mode | workers | images/s | MiB |\n|---|---|---|---|---|")
    for r in prep:
        print(f"| {r['format']} | {r['mode']} | {r['workers']} | {r['images_per_s']} | {r['mib']} |")
    print("\n| format | loader | images/s |\n|---|---|---|")
    for r in loaders:
        print(f"| {r['format']} | {r['loader']} | {r.get('images_per_s', r.get('error'))} |")
    return _write_result(args, argv, src, "prepare", prepare=prep, loaders=loaders)


def _write_result(args: argparse.Namespace, argv: list[str] | None, src: Path, name: str, **rows: Any) -> int:
    given = sys.argv[1:] if argv is None else argv
    result = {"benchmark": name, "env": env_info("cpu"),
              "command": "python3 benchmarks/bench_prepare.py " + shlex.join(given),
              "source": str(src), "cpu_count": os.cpu_count(), **rows}
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
