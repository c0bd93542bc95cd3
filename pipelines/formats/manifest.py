"""The manifest of a prepared split (``OUT/<split>/manifest.json``): schema, atomic writes, reading.

The one reader and writer of manifests: ``swav-fast prepare`` writes, ``inspect`` and every loader read.

Schema (the DALI and FFCV readers rely on it)::

    format            "tfrecord" | "wds" | "beton"
    num_samples       images stored (bad files excluded)
    classes           class names, index order
    class_to_idx      {name: index}
    counts_per_class  {name: images stored}
    shards            [{"path", "index", "num_samples", "bytes", "sha256", ...}]  (relative to the split)
    bad_files         [{"path", "reason"}]  (paths relative to the source folder)

plus provenance (``split``, ``source``, ``params``, ``source_fingerprint``, ``num_source_files``, ...),
``source_kind`` (imagefolder, train-tar, val-tar, val-folder), ``converted_files`` (``[{"path",
"reason"}]``: CMYK / grayscale / PNG data converted to RGB JPEG), and when used ``labels`` (the
validation labels file: path, format, SHA-256) and ``subset`` (``--classes`` / ``--per-class``).
Paths are the ImageFolder paths ``<class>/<file>``, also for an archive source.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipelines.atomic import atomic_write_json
from pipelines.errors import DataError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
FORMATS = ("tfrecord", "wds", "beton")
SHARD_EXT = {"tfrecord": ".tfrecord", "wds": ".tar", "beton": ".beton"}
INDEX_EXT = ".idx"
REQUIRED_KEYS = (
    "format",
    "num_samples",
    "classes",
    "class_to_idx",
    "counts_per_class",
    "shards",
    "bad_files",
)
SHARD_KEYS = ("path", "index", "num_samples", "bytes", "sha256")

#: What a reader finds in each format (copied into the manifest so the folder documents itself).
LAYOUT = {
    "tfrecord": "each record a tf.train.Example: image/encoded (bytes_list, RGB JPEG), image/class/label "
    "(int64_list), image/index (int64_list, position in the sorted source list); "
    "<shard>.idx: DALI tfrecord2idx lines 'offset size'",
    "wds": "tar members <key>.jpg (RGB JPEG) and <key>.cls (label, ASCII decimal); key = zero-padded source "
    "index; <shard>.idx: DALI wds2idx v1.2 index",
    "beton": "FFCV .beton (version 2) with fields image (RGBImageField, JPEG) and label (IntField)",
}


def shard_name(split: str, shard_id: int, fmt: str) -> str:
    """``<split>-00000.tfrecord`` / ``.tar``; the beton is one file ``<split>.beton``."""
    if fmt == "beton":
        return f"{split}.beton"
    return f"{split}-{shard_id:05d}{SHARD_EXT[fmt]}"


def index_name(split: str, shard_id: int) -> str:
    return f"{split}-{shard_id:05d}{INDEX_EXT}"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON through :func:`pipelines.atomic.atomic_write_json`;
    :class:`DataError` naming the file when it cannot be written."""
    try:
        atomic_write_json(path, data)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None


def is_prepared_manifest(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a ``swav-fast prepare`` manifest: a JSON object with a ``format`` of
    :data:`FORMATS` (its other keys are checked when it is read). Any other file (a foreign
    ``manifest.json`` in an ImageFolder, an unreadable one) is not: the folder is then read as an
    ImageFolder."""
    try:
        if os.path.getsize(path) > 1 << 30:
            return False
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") in FORMATS


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """``path`` may be the split folder or the manifest file itself."""
    p = Path(path)
    return p if p.name == MANIFEST_NAME and not p.is_dir() else p / MANIFEST_NAME


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate ``<split dir>/manifest.json``; raise :class:`DataError` naming the problem."""
    mpath = manifest_path(path)
    if not mpath.exists():
        if Path(path).is_dir() and any((Path(path) / d / MANIFEST_NAME).exists() for d in ("train", "val")):
            raise DataError(f"{path} holds prepared splits, not one: pass {Path(path) / 'train'} (or val)")
        raise DataError(f"no prepared dataset at {path}: {mpath} not found (run swav-fast prepare first)")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read manifest {mpath}: {exc}") from None
    validate_manifest(m, str(mpath))
    return m


def validate_manifest(m: Any, where: str = "manifest") -> None:
    """Structural checks: keys, types, class map and totals agree."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
    if m["format"] not in FORMATS:
        raise DataError(f"{where}: unknown format {m['format']!r}; expected one of {', '.join(FORMATS)}")
    classes = m["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{where}: classes must be a list of names")
    if m["class_to_idx"] != {c: i for i, c in enumerate(classes)}:
        raise DataError(f"{where}: class_to_idx does not match the order of classes")
    if not isinstance(m["shards"], list):
        raise DataError(f"{where}: shards must be a list")
    for k, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or any(key not in s for key in SHARD_KEYS):
            raise DataError(f"{where}: shard {k} lacks one of {', '.join(SHARD_KEYS)}")
        if "/" in s["path"] or s["path"].startswith("."):
            raise DataError(
                f"{where}: shard path {s['path']!r} must be a plain file name in the split folder"
            )
    total = sum(int(s["num_samples"]) for s in m["shards"])
    if total != m["num_samples"]:
        raise DataError(f"{where}: shards hold {total} samples but num_samples is {m['num_samples']}")
    counts = m["counts_per_class"]
    if not isinstance(counts, dict) or set(counts) != set(classes):
        raise DataError(f"{where}: counts_per_class must have one entry per class")
    if sum(int(v) for v in counts.values()) != m["num_samples"]:
        raise DataError(
            f"{where}: counts_per_class sum to {sum(counts.values())}, "
            f"not num_samples = {m['num_samples']}"
        )


def shard_paths(split_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Absolute ``(shard, index or None)`` paths of a manifest's shards."""
    root = Path(split_dir)
    if root.name == MANIFEST_NAME:
        root = root.parent
    return [
        (str(root / s["path"]), str(root / s["index"]) if s.get("index") else None)
        for s in manifest["shards"]
    ]
