"""Shard writers: TFRecord (+ DALI ``tfrecord2idx`` index) and webdataset tar (+ DALI ``wds2idx`` index).

A writer streams into ``<name>.tmp`` files, hashing as it goes; :meth:`ShardWriter.close` fsyncs,
renames the index and then the shard to their final names and returns the shard's manifest entry.
A shard that is never closed leaves only ``.tmp`` files, which a rerun overwrites.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from swav_fast.errors import DataError

from .manifest import fsync_dir, index_name, shard_name
from .records import encode_example, tar_end, tar_header, tar_padding, tfrecord_frame

TMP_SUFFIX = ".tmp"
#: wds2idx index format version written on the first line.
WDS_INDEX_VERSION = "v1.2"


def key_digits(num_source: int) -> int:
    """Digits of the zero-padded webdataset key: at least 8, enough for every source index."""
    return max(8, len(str(max(0, num_source - 1))))


class _HashedFile:
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
            self._data = _HashedFile(self.split_dir / (self.name + TMP_SUFFIX))
            self._idx = _HashedFile(self.split_dir / (self.index + TMP_SUFFIX))
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


class TFRecordShardWriter(ShardWriter):
    """``tf.train.Example`` records; the index has one ``offset size`` line per record (DALI tfrecord2idx)."""

    fmt = "tfrecord"

    def add(self, index: int, label: int, jpeg: bytes) -> None:
        example = encode_example(
            {"image/encoded": jpeg, "image/class/label": int(label), "image/index": int(index)}
        )
        record = tfrecord_frame(example)
        self._idx.write(f"{self._data.size} {len(record)}\n".encode())
        self._data.write(record)
        self.num_samples += 1


class WdsShardWriter(ShardWriter):
    """Tar members ``<key>.jpg`` then ``<key>.cls``; the index is DALI's wds2idx v1.2 format.

    Index: first line ``v1.2 <samples>``, then per sample the components in archive order as
    ``<ext> <data offset> <size> <member name>`` separated by spaces.
    """

    fmt = "wds"

    def __init__(self, split_dir: Path, split: str, shard_id: int, digits: int) -> None:
        super().__init__(split_dir, split, shard_id)
        self.digits = digits
        self._lines: list[str] = []

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        self._data.write(tar_header(name, len(data)))
        offset = self._data.size
        self._data.write(data)
        self._data.write(tar_padding(len(data)))
        return offset, len(data)

    def add(self, index: int, label: int, jpeg: bytes) -> None:
        key = f"{int(index):0{self.digits}d}"
        parts = []
        for ext, data in (("jpg", jpeg), ("cls", str(int(label)).encode("ascii"))):
            name = f"{key}.{ext}"
            offset, size = self._member(name, data)
            parts.append(f"{ext} {offset} {size} {name}")
        self._lines.append(" ".join(parts))
        self.num_samples += 1

    def _finish_data(self) -> None:
        self._data.write(tar_end(self._data.size))
        self._idx.write(f"{WDS_INDEX_VERSION} {len(self._lines)}\n".encode())
        self._idx.write("".join(line + "\n" for line in self._lines).encode())
