"""``swav-fast inspect PATH``: validate a prepared dataset against its manifest."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="validate a prepared dataset (counts, index files, a decoded sample)",
        description="Check a prepared split (or every split under a prepare --out folder): sample counts "
        "against the manifest, shards and index files present and consistent, labels in range, "
        "samples decode. Exits 2 with the list of problems on any mismatch.",
    )
    p.add_argument("path", metavar="PATH", help="prepare --out folder, a split folder, or its manifest.json")
    p.add_argument(
        "--checksums", action="store_true", help="also verify every shard's SHA-256 (reads everything)"
    )
    p.add_argument(
        "--deep",
        action="store_true",
        help="read every sample: record CRCs, labels counted per class against the manifest",
    )
    p.add_argument(
        "--samples", type=int, default=1, metavar="K", help="samples decoded per shard (default: %(default)s)"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from swav_fast.prepare import inspect_dataset

    for report in inspect_dataset(args.path, checksums=args.checksums, deep=args.deep, samples=args.samples):
        print(report.summary())
        for w in report.warnings:
            print(f"  warning: {w}")
    return 0
