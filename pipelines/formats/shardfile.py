"""What the sharded formats (TFRecord, webdataset) share: an atomic shard + index writer, and a
memory-mapped random-access reader over a manifest's shards.

A writer streams into ``<name>.tmp`` files, hashing as it goes; :meth:`ShardWriter.close` fsyncs,
renames the index and then the shard to their final names and returns the shard's manifest entry.
A shard that is never closed leaves only ``.tmp`` files, which a rerun overwrites.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import fsync_dir
from pipelines.errors import DataError

from .manifest import index_name, shard_name
from .probe import BadImage

TMP_SUFFIX = ".tmp"


# -- writing --------------------------------------------------------------------------------------
class HashedFile:
    """A binary file opened for writing that tracks its SHA-256 and size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)

    def flush(self) -> None:
        """Hand buffered data to the OS (enough to survive a killed process)."""
        self._f.flush()

    def finish(self) -> str:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._h.hexdigest()

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class ShardWriter:
    """Base class: one shard plus its index file, written atomically."""

    fmt = ""

    def __init__(self, split_dir: Path, split: str, shard_id: int) -> None:
        self.split_dir = Path(split_dir)
        self.shard_id = shard_id
        self.name = shard_name(split, shard_id, self.fmt)
        self.index = index_name(split, shard_id)
        self.num_samples = 0
        try:
            self._data = HashedFile(self.split_dir / (self.name + TMP_SUFFIX))
            self._idx = HashedFile(self.split_dir / (self.index + TMP_SUFFIX))
        except OSError as exc:
            raise DataError(
                f"cannot create shard {self.split_dir / self.name}: {exc.strerror or exc}"
            ) from None

    def add(self, index: int, label: int, jpeg: bytes) -> None:
        raise NotImplementedError

    def _finish_data(self) -> None:
        """Hook for trailing bytes (tar end blocks) and index headers."""

    def flush(self) -> None:
        self._data.flush()
        self._idx.flush()

    def close(self) -> dict[str, Any]:
        """Finish, rename into place (index first, shard last), return the manifest entry."""
        self._finish_data()
        sha = self._data.finish()
        idx_sha = self._idx.finish()
        os.replace(self._idx.path, self.split_dir / self.index)
        os.replace(self._data.path, self.split_dir / self.name)
        fsync_dir(self.split_dir)
        return {
            "path": self.name,
            "index": self.index,
            "num_samples": self.num_samples,
            "bytes": self._data.size,
            "sha256": sha,
            "index_bytes": self._idx.size,
            "index_sha256": idx_sha,
        }

    def abort(self) -> None:
        """Remove the temp files (nothing final was written)."""
        self._data.discard()
        self._idx.discard()


# -- reading --------------------------------------------------------------------------------------
class ShardedSource:
    """Shared by the TFRecord and webdataset sources: memory-mapped shards and per-sample locations.

    Subclasses fill ``_paths`` (one per shard) and ``_shard`` (per sample, its shard number).
    """

    root: str
    classes: list[str]
    _shard: np.ndarray
    _paths: list[str]

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        self.root = root
        self.classes = [str(c) for c in manifest.get("classes", [])]
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self._shard)

    def _view(self, shard: int) -> mmap.mmap:
        mm = self._maps.get(shard)
        if mm is None:
            path = self._paths[shard]
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot open shard {path}: {e}") from e
            self._maps[shard] = mm
        return mm

    def _check_label(self, label: int) -> int:
        if self.classes and not 0 <= label < len(self.classes):
            raise BadImage(f"label {label} outside the manifest's {len(self.classes)} classes")
        return label

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (DataLoader workers): the memory maps are reopened on first use."""
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


def manifest_shards(manifest: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """The manifest's shard entries, each with a ``path`` to a file that exists (DataError otherwise)."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"manifest in {root} lists no shards")
    for sh in shards:
        if not isinstance(sh, dict) or not isinstance(sh.get("path"), str):
            raise DataError(f"manifest in {root} has a shard entry without a path: {sh!r}")
        if not os.path.exists(os.path.join(root, sh["path"])):
            raise DataError(f"shard {os.path.join(root, sh['path'])} listed in the manifest is missing")
    return shards


def check_count(path: str, found: int, expected: Any) -> None:
    if expected is not None and int(expected) != found:
        raise DataError(f"shard {path} holds {found} samples but the manifest says {expected}")
