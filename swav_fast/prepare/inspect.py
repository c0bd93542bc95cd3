"""``inspect_dataset``: validate a prepared split against its manifest.

Always (cheap, seek-based): manifest schema and totals; every shard present with the manifest's
size; every index file present and agreeing with the shard's structure (record / tar member
offsets and sizes, sample count); for beton the header, metadata, allocation table and per-class
label counts; the first sample of every shard decodes as an RGB JPEG with a label in range.
``checksums=True`` also compares SHA-256 digests; ``deep=True`` reads every sample (TFRecord CRCs,
labels counted per class, every key and label present).

The shards are read with the loaders' own readers and index formats (:mod:`pipelines.formats`).
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from swav_fast.errors import DataError

from pipelines.formats.beton import JPEG_MODE, read_beton_tables
from pipelines.formats.manifest import MANIFEST_NAME, read_manifest, sha256_file
from pipelines.formats.tfrecord import decode_example, iter_tfrecord_offsets, read_tfrecord_payload
from pipelines.formats.wds import group_samples, index_text, parse_label, tar_members

#: Problems listed in the error message (the report keeps all of them).
MAX_LISTED = 20


@dataclass
class InspectReport:
    """Outcome for one split: ``problems`` make it fail, ``warnings`` do not."""

    split_dir: str
    format: str = ""
    num_samples: int = 0
    num_shards: int = 0
    samples_decoded: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (
            f"{self.split_dir}: {self.format}, {self.num_samples} samples in {self.num_shards} shard(s), "
            f"{self.samples_decoded} sample(s) decoded: {state}"
        )


def find_splits(path: str | os.PathLike[str]) -> list[Path]:
    """The split folders under ``path``: itself if it holds a manifest, else its sub-folders that do."""
    p = Path(path)
    if p.is_file() and p.name == MANIFEST_NAME:
        return [p.parent]
    if (p / MANIFEST_NAME).exists():
        return [p]
    if p.is_dir():
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / MANIFEST_NAME).exists())
        if subs:
            return subs
    if not p.exists():
        raise DataError(f"nothing to inspect: {p} does not exist")
    raise DataError(f"no prepared dataset at {p}: no {MANIFEST_NAME} in it or in its sub-folders")


def inspect_dataset(
    path: str | os.PathLike[str],
    *,
    checksums: bool = False,
    deep: bool = False,
    samples: int = 1,
    seed: int = 0,
    raise_on_problems: bool = True,
) -> list[InspectReport]:
    """Validate every split found at ``path`` (a split folder, its manifest, or the prepare ``--out``).

    ``samples``: samples decoded per shard (the first, then random ones).  With ``raise_on_problems``
    a :class:`DataError` lists the problems found; otherwise they are only in the reports.
    """
    reports = [
        _inspect_split(d, checksums, deep, max(0, int(samples)), random.Random(seed))
        for d in find_splits(path)
    ]
    problems = [f"{r.split_dir}: {p}" for r in reports for p in r.problems]
    if problems and raise_on_problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} problem(s) found:\n  " + "\n  ".join(problems[:MAX_LISTED]) + more)
    return reports


def _inspect_split(
    split_dir: Path, checksums: bool, deep: bool, samples: int, rng: random.Random
) -> InspectReport:
    rep = InspectReport(str(split_dir))
    try:
        m = read_manifest(split_dir)
    except DataError as exc:
        rep.problems.append(str(exc))
        return rep
    rep.format, rep.num_samples, rep.num_shards = m["format"], m["num_samples"], len(m["shards"])
    if (split_dir / ".prepare-work").exists():
        rep.warnings.append("a .prepare-work folder is present (an interrupted run); rerun prepare to finish")
    num_classes = len(m["classes"])
    counts = np.zeros(num_classes, dtype=np.int64)
    counted = False
    listed = {m_s["path"] for m_s in m["shards"]} | {m_s["index"] for m_s in m["shards"] if m_s.get("index")}
    for s in m["shards"]:
        shard = split_dir / s["path"]
        if not shard.is_file():
            rep.problems.append(f"shard {s['path']} is missing")
            continue
        size = shard.stat().st_size
        if size != s["bytes"]:
            rep.problems.append(
                f"shard {s['path']} is {size} bytes, the manifest says {s['bytes']} "
                f"({'truncated' if size < s['bytes'] else 'larger'})"
            )
            continue
        if checksums and sha256_file(shard) != s["sha256"]:
            rep.problems.append(f"shard {s['path']}: SHA-256 does not match the manifest")
            continue
        try:
            if m["format"] == "beton":
                counts += _check_beton(shard, s, m, samples, rng, rep)
                counted = True
            elif m["format"] == "tfrecord":
                c = _check_tfrecord(split_dir, shard, s, num_classes, samples, rng, deep, rep)
                if c is not None:
                    counts += c
            else:
                c = _check_wds(split_dir, shard, s, m, samples, rng, deep, rep)
                if c is not None:
                    counts += c
        except (OSError, ValueError, tarfile.TarError) as exc:
            rep.problems.append(f"shard {s['path']}: {exc}")
    counted = counted or (deep and not rep.problems)
    if counted:
        expected = np.array([m["counts_per_class"][c] for c in m["classes"]])
        for k in np.nonzero(counts != expected)[0]:
            rep.problems.append(
                f"class {m['classes'][k]!r}: {counts[k]} samples in the shards, "
                f"the manifest says {expected[k]}"
            )
    stray = sorted(
        n
        for n in os.listdir(split_dir)
        if n.endswith(".tmp")
        or (n.startswith(m.get("split", split_dir.name)) and n not in listed and n != MANIFEST_NAME)
    )
    if stray:
        rep.warnings.append(
            f"files not in the manifest: {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}"
        )
    return rep


def _pick(n: int, samples: int, rng: random.Random) -> list[int]:
    if n == 0 or samples == 0:
        return []
    return [0, *sorted(rng.sample(range(1, n), min(n, samples) - 1))]


def _check_jpeg(data: bytes, where: str, rep: InspectReport, size: tuple[int, int] | None = None) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()
            got = im.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding
        rep.problems.append(f"{where}: image does not decode ({type(exc).__name__}: {exc})")
        return
    if fmt != "JPEG" or mode != "RGB":
        rep.problems.append(f"{where}: stored image is {fmt} {mode}, expected an RGB JPEG")
    elif size is not None and got != size:
        rep.problems.append(f"{where}: image is {got[0]}x{got[1]}, the metadata says {size[0]}x{size[1]}")
    else:
        rep.samples_decoded += 1


def _check_label(label: int, num_classes: int, where: str, rep: InspectReport) -> bool:
    if not 0 <= label < num_classes:
        rep.problems.append(f"{where}: label {label} is outside [0, {num_classes})")
        return False
    return True


def _read_index(split_dir: Path, s: dict[str, Any], rep: InspectReport) -> list[str] | None:
    if not s.get("index"):
        rep.problems.append(f"shard {s['path']}: the manifest lists no index file")
        return None
    path = split_dir / s["index"]
    if not path.is_file():
        rep.problems.append(f"index {s['index']} is missing")
        return None
    if "index_bytes" in s and path.stat().st_size != s["index_bytes"]:
        rep.problems.append(
            f"index {s['index']} is {path.stat().st_size} bytes, the manifest says {s['index_bytes']}"
        )
        return None
    return path.read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------- TFRecord
def _check_tfrecord(
    split_dir: Path,
    shard: Path,
    s: dict[str, Any],
    num_classes: int,
    samples: int,
    rng: random.Random,
    deep: bool,
    rep: InspectReport,
) -> np.ndarray | None:
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        records = list(iter_tfrecord_offsets(f, size, check_crc=True))
        if len(records) != s["num_samples"]:
            rep.problems.append(
                f"shard {s['path']} holds {len(records)} records, the manifest says {s['num_samples']}"
            )
        lines = _read_index(split_dir, s, rep)
        if lines is not None:
            try:
                index = [tuple(int(x) for x in line.split()) for line in lines]
            except ValueError:
                index = []
            if index != records:
                rep.problems.append(
                    f"index {s['index']} does not match the records of {s['path']} "
                    f"({len(index)} entries for {len(records)} records)"
                )
        counts = np.zeros(num_classes, dtype=np.int64)
        picks = _pick(len(records), samples, rng)
        todo = range(len(records)) if deep else picks
        decode = set(picks)
        for r in todo:
            off, n = records[r]
            where = f"{s['path']} record {r}"
            ex = decode_example(read_tfrecord_payload(f, off, n, check_crc=True))
            missing = [k for k in ("image/encoded", "image/class/label", "image/index") if k not in ex]
            if missing:
                rep.problems.append(f"{where}: feature(s) {', '.join(missing)} missing")
                continue
            label = int(ex["image/class/label"][0])  # type: ignore[arg-type]
            if _check_label(label, num_classes, where, rep):
                counts[label] += 1
            if r in decode:
                _check_jpeg(ex["image/encoded"][0], where, rep)  # type: ignore[arg-type]
    return counts if deep else None


# ----------------------------------------------------------------------------- webdataset
def _check_wds(
    split_dir: Path,
    shard: Path,
    s: dict[str, Any],
    m: dict[str, Any],
    samples: int,
    rng: random.Random,
    deep: bool,
    rep: InspectReport,
) -> np.ndarray | None:
    num_classes = len(m["classes"])
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        groups = group_samples(tar_members(f, size))
        if len(groups) != s["num_samples"]:
            rep.problems.append(
                f"shard {s['path']} holds {len(groups)} samples, the manifest says {s['num_samples']}"
            )
        lines = _read_index(split_dir, s, rep)
        if lines is not None:
            if lines != index_text(groups):
                rep.problems.append(
                    f"index {s['index']} does not match the members of {s['path']} "
                    f"({max(0, len(lines) - 1)} entries for {len(groups)} samples)"
                )
        counts = np.zeros(num_classes, dtype=np.int64)
        picks = _pick(len(groups), samples, rng)
        todo = range(len(groups)) if deep else picks
        decode = set(picks)
        for g in todo:
            parts = {ext: (off, n) for ext, off, n, _ in groups[g]}
            where = f"{s['path']} sample {groups[g][0][3].split('.')[0]}"
            if set(parts) != {"jpg", "cls"}:
                rep.problems.append(f"{where}: members {sorted(parts)}, expected jpg and cls")
                continue
            f.seek(parts["cls"][0])
            try:
                label = parse_label(f.read(parts["cls"][1]))
            except ValueError as exc:
                rep.problems.append(f"{where}: {exc}")
                continue
            if _check_label(label, num_classes, where, rep):
                counts[label] += 1
            if g in decode:
                f.seek(parts["jpg"][0])
                _check_jpeg(f.read(parts["jpg"][1]), where, rep)
    return counts if deep else None


# ----------------------------------------------------------------------------- beton
def _check_beton(
    shard: Path, s: dict[str, Any], m: dict[str, Any], samples: int, rng: random.Random, rep: InspectReport
) -> np.ndarray:
    num_classes = len(m["classes"])
    header, _, meta, alloc = read_beton_tables(shard)
    n = int(header["num_samples"])
    if n != s["num_samples"]:
        rep.problems.append(f"{s['path']} holds {n} samples, the manifest says {s['num_samples']}")
    if len(alloc) != n or not np.array_equal(np.sort(alloc["sample_id"]), np.arange(n, dtype=np.uint64)):
        rep.problems.append(f"{s['path']}: allocation table has {len(alloc)} entries, not one per sample")
        return np.zeros(num_classes, dtype=np.int64)
    order = np.argsort(alloc["sample_id"])
    ptr, nbytes = alloc["ptr"][order], alloc["size"][order]
    table_ptr = int(header["alloc_table_ptr"])
    if n and (np.any(meta["f0"]["data_ptr"] != ptr) or int((ptr + nbytes).max()) > table_ptr):
        rep.problems.append(f"{s['path']}: sample data pointers are inconsistent with the allocation table")
        return np.zeros(num_classes, dtype=np.int64)
    if n and np.any(meta["f0"]["mode"] != JPEG_MODE):
        rep.problems.append(f"{s['path']}: some images are not stored as JPEG")
    labels = meta["f1"].astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        rep.problems.append(f"{s['path']}: {int(bad.sum())} label(s) outside [0, {num_classes})")
    with open(shard, "rb") as f:
        for r in _pick(n, samples, rng):
            f.seek(int(ptr[r]))
            w, h = int(meta["f0"]["width"][r]), int(meta["f0"]["height"][r])
            _check_jpeg(f.read(int(nbytes[r])), f"{s['path']} sample {r}", rep, (w, h))
    return np.bincount(labels[~bad], minlength=num_classes)[:num_classes]
