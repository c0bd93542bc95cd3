"""webdataset tar shards: one writer, one reader, one member walk, one index format.

A sample is the tar members ``<key>.jpg`` (the JPEG) and ``<key>.cls`` (its label, ASCII decimal);
``key`` is the zero-padded source index.  Members are plain ustar entries (mtime 0, root-owned,
mode 0644), so the output is byte-for-byte deterministic.  The index next to each shard is DALI's
``wds2idx`` v1.2 format: a first line ``v1.2 <samples>``, then per sample its members in archive
order as ``<ext> <data offset> <size> <member name>`` groups separated by spaces.
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

from pipelines.errors import DataError

from .probe import BadImage
from .shardfile import ShardedSource, ShardWriter, check_count, manifest_shards

log = logging.getLogger("pipelines")

TAR_BLOCK = 512
#: tar archives are padded to a multiple of this (as GNU tar and Python's tarfile do).
TAR_RECORD = 20 * TAR_BLOCK
#: wds2idx index format version written on the first line.
WDS_INDEX_VERSION = "v1.2"
#: member extensions read as the sample's image, in order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

#: one member of a sample: (extension, data offset, size, member name)
Member = tuple[str, int, int, str]


# ----------------------------------------------------------------------------- tar encoding
def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header block for a regular file (mtime 0, root-owned, mode 0644)."""
    info = tarfile.TarInfo(name)
    info.size = int(size)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def tar_padding(size: int) -> bytes:
    """Zero bytes that bring a member of ``size`` bytes to the next 512-byte block."""
    return b"\0" * (-size % TAR_BLOCK)


def tar_end(position: int) -> bytes:
    """End-of-archive: two zero blocks, then zeros up to the next 10240-byte record."""
    end = position + 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + (-end % TAR_RECORD))


def key_digits(num_source: int) -> int:
    """Digits of the zero-padded webdataset key: at least 8, enough for every source index."""
    return max(8, len(str(max(0, num_source - 1))))


# ----------------------------------------------------------------------------- tar walk
def _pax_path(raw: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``<len> <key>=<value>\\n`` records)."""
    pos = 0
    while pos < len(raw):
        sp = raw.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(raw[pos:sp])
        except ValueError:
            break
        key, _, value = raw[sp + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += max(length, 1)
    return None


def tar_members(f: IO[bytes], size: int) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of the regular files in a tar, by seeking from header to header.

    GNU long names and pax ``path`` records name the member that follows them.  Raises ``ValueError``
    on a truncated archive (a member past the end, or no end-of-archive block) or a corrupt header.
    """
    out: list[tuple[str, int, int]] = []
    pos = 0
    long_name: str | None = None
    while True:
        if pos + TAR_BLOCK > size:
            raise ValueError(f"truncated tar: no end-of-archive block (stops at byte {size})")
        f.seek(pos)
        block = f.read(TAR_BLOCK)
        if block == b"\0" * TAR_BLOCK:
            return out
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            raise ValueError(f"corrupt tar header at byte {pos}: {e}") from None
        data = pos + TAR_BLOCK
        if data + info.size > size:
            raise ValueError(
                f"truncated tar: member {info.name} needs {info.size} bytes at {data}, file has {size}"
            )
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
            f.seek(data)
            raw = f.read(info.size)
            long_name = (raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                         if info.type == tarfile.GNUTYPE_LONGNAME else _pax_path(raw))
        else:
            if info.isreg():
                out.append((long_name or info.name, data, info.size))
            long_name = None
        pos = data + info.size + (-info.size % TAR_BLOCK)


def group_samples(members: Sequence[tuple[str, int, int]]) -> list[list[Member]]:
    """Consecutive members with one key (the name up to the first dot of its base name) form a sample."""
    samples: list[list[Member]] = []
    last = None
    for name, off, n in members:
        dot = name.find(".", name.rfind("/") + 1)
        if dot <= 0:
            continue
        stem, ext = name[:dot], name[dot + 1:]
        if stem != last:
            samples.append([])
            last = stem
        samples[-1].append((ext, off, n, name))
    return samples


def scan_tar(path: str, idx: str | None = None) -> list[list[Member]]:
    """The samples of ``path`` from its tar headers (what the index would say); DataError if unreadable."""
    log.warning("webdataset index %s is missing; reading the headers of %s (run wds2idx to avoid this)",
                idx, path)
    try:
        with open(path, "rb") as f:
            return group_samples(tar_members(f, os.fstat(f.fileno()).st_size))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read webdataset shard {path}: {e}") from e


# ----------------------------------------------------------------------------- index
def index_line(sample: Sequence[Member]) -> str:
    """One sample's ``wds2idx`` line (without the newline)."""
    return " ".join(f"{ext} {off} {n} {name}" for ext, off, n, name in sample)


def index_text(samples: Sequence[Sequence[Member]]) -> list[str]:
    """The lines of the ``wds2idx`` index of ``samples`` (header first)."""
    return [f"{WDS_INDEX_VERSION} {len(samples)}"] + [index_line(s) for s in samples]


def read_wds_index(path: str) -> list[list[Member]]:
    """The samples listed by a ``wds2idx`` index file (DataError if malformed)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read webdataset index {path}: {e}") from e
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1."):
        raise DataError(f"webdataset index {path}: unsupported header {lines[:1]} (expected 'v1.2 <count>')")
    out = []
    for ln, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise DataError(f"webdataset index {path}, line {ln}: expected 'ext offset size name' groups")
        out.append([(parts[k], int(parts[k + 1]), int(parts[k + 2]), parts[k + 3])
                    for k in range(0, len(parts), 4)])
    if len(out) != int(head[1]):
        raise DataError(f"webdataset index {path} announces {head[1]} samples but lists {len(out)}")
    return out


def parse_label(text: bytes) -> int:
    """The label of a ``.cls`` member; :class:`BadImage` when it is not an ASCII integer."""
    try:
        return int(bytes(text).strip().decode("ascii"))
    except ValueError:
        raise BadImage(f".cls is {bytes(text)[:20]!r}, not an ASCII integer") from None


# ----------------------------------------------------------------------------- writer
class WdsShardWriter(ShardWriter):
    """Tar members ``<key>.jpg`` then ``<key>.cls``; the index is DALI's wds2idx v1.2 format."""

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
        parts: list[Member] = []
        for ext, data in (("jpg", jpeg), ("cls", str(int(label)).encode("ascii"))):
            name = f"{key}.{ext}"
            offset, size = self._member(name, data)
            parts.append((ext, offset, size, name))
        self._lines.append(index_line(parts))
        self.num_samples += 1

    def _finish_data(self) -> None:
        self._data.write(tar_end(self._data.size))
        self._idx.write(f"{WDS_INDEX_VERSION} {len(self._lines)}\n".encode())
        self._idx.write("".join(line + "\n" for line in self._lines).encode())


# ----------------------------------------------------------------------------- reader
def sample_table(samples: Sequence[Sequence[Member]], path: str) -> tuple[np.ndarray, list[str]]:
    """``[N, 4]`` ``(image offset, image size, cls offset, cls size)`` and the keys of ``samples``."""
    table = np.zeros((len(samples), 4), dtype=np.int64)
    keys = []
    for k, sample in enumerate(samples):
        parts = {ext.lower(): (off, size, name) for ext, off, size, name in sample}
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        cls = parts.get("cls")
        if img is None or cls is None:
            name = sample[0][3] if sample else f"#{k}"
            raise DataError(f"webdataset shard {path}: sample {name} lacks a .jpg or .cls member")
        table[k] = (img[0], img[1], cls[0], cls[1])
        keys.append(img[2].rsplit(".", 1)[0])
    return table, keys


class WebDatasetSource(ShardedSource):
    """Random access to the samples of a prepared (or foreign) webdataset split.

    Members are located through the ``wds2idx`` index; a missing index is rebuilt by reading the tar
    headers.
    """

    format = "wds"
    IMAGE_EXTS = IMAGE_EXTS

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        shards, tables, keys, paths = [], [], [], []
        for k, sh in enumerate(manifest_shards(manifest, root)):
            path = os.path.join(root, sh["path"])
            idx = os.path.join(root, sh["index"]) if sh.get("index") else None
            members = read_wds_index(idx) if idx and os.path.exists(idx) else scan_tar(path, idx)
            table, names = sample_table(members, path)
            check_count(path, len(table), sh.get("num_samples"))
            paths.append(path)
            shards.append(np.full(len(table), k, dtype=np.int64))
            tables.append(table)
            keys.extend(names)
        self._paths = paths
        self._keys = keys
        self._shard = np.concatenate(shards) if shards else np.zeros(0, np.int64)
        self._table = np.concatenate(tables) if tables else np.zeros((0, 4), np.int64)

    def read(self, i: int) -> tuple[bytes, int]:
        mm = self._view(int(self._shard[i]))
        img_off, img_size, cls_off, cls_size = (int(x) for x in self._table[i])
        if max(img_off + img_size, cls_off + cls_size) > len(mm):
            raise BadImage("tar member lies outside the shard: truncated shard?")
        label = parse_label(mm[cls_off:cls_off + cls_size])
        return mm[img_off:img_off + img_size], self._check_label(label)

    def name(self, i: int) -> str:
        return f"{self._paths[int(self._shard[i])]}#{self._keys[i]}"
