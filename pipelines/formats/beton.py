"""FFCV ``.beton`` (file format version 2) written sequentially, resumable at chunk boundaries.

Layout (little-endian, as FFCV's ``DatasetWriter`` produces and ``ffcv.reader.Reader`` reads)::

    header        version u2 | num_fields u2 | page_size u4 | num_samples u8 | alloc_table_ptr u8
    field descs   per field: type_id u1 | name u1[16] | arguments u1[1024]   (image: 2, label: 1)
    metadata      per sample: image (mode u1, width u2, height u2, data_ptr u8) | label i8  (aligned)
    (zeros up to a page boundary)
    pages         page_size bytes each; a sample's JPEG never straddles two pages
    alloc table   per sample: sample_id u8 | ptr u8 | size u8

FFCV needs ``num_samples`` before the data region, which we do not know until every file has been
tried (bad files are skipped), so room for the metadata of *every source file* is reserved and the
data region starts after it; the reader only uses the first ``num_samples`` rows.  Writing and the
random-access reader (:class:`BetonSource`) need no ``ffcv`` import; the ``ffcv`` loader backend reads
the same files with FFCV.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import fsync_dir
from pipelines.errors import DataError

from .folder import ImageFolderIndex
from .probe import BadImage
from .manifest import MANIFEST_NAME, read_manifest, shard_paths

BETON_VERSION = 2
DEFAULT_PAGE_SIZE = 8 << 20  # FFCV's default (4 x 2 MiB huge pages)
MIN_PAGE_SIZE = 1 << 21
MAX_PAGE_SIZE = 1 << 31
TYPE_INT = 1
TYPE_RGB_IMAGE = 2
JPEG_MODE = 0

HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD_DESC = np.dtype(
    [("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True
)
IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
SAMPLE_META = np.dtype([("", IMAGE_META), ("", "<i8")], align=True)  # fields f0 (image), f1 (label)
ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELDS = (("image", TYPE_RGB_IMAGE), ("label", TYPE_INT))


def metadata_start() -> int:
    return HEADER.itemsize + len(FIELDS) * FIELD_DESC.itemsize


def data_start(num_source: int, page_size: int) -> int:
    """First page: after header, field descriptors and metadata room for ``num_source`` samples."""
    end = metadata_start() + num_source * SAMPLE_META.itemsize
    return -(-end // page_size) * page_size


def check_page_size(page_size: int) -> int:
    page_size = int(page_size)
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise DataError(
            f"beton page size must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}], "
            f"got {page_size}"
        )
    return page_size


def join_rows(chunks: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The rows of ``chunks`` in one array, byte for byte: ``np.concatenate`` copies a structured array
    field by field and leaves its padding (3 bytes per ``SAMPLE_META`` row) uninitialised, which would
    make two runs write different files."""
    out = np.zeros(sum(len(c) for c in chunks), dtype=dtype)
    raw, pos = out.view(np.uint8), 0
    for c in chunks:
        b = np.ascontiguousarray(c).view(np.uint8).reshape(-1)
        raw[pos:pos + len(b)] = b
        pos += len(b)
    return out


class BetonWriter:
    """Appends JPEG samples into pages of ``<final>.tmp``; :meth:`checkpoint` makes a chunk resumable.

    ``resume`` = ``(file_end, meta rows, alloc rows)`` of the completed chunks, or None for a fresh file.
    """

    def __init__(
        self,
        final_path: Path,
        num_source: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        resume: tuple[int, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.final_path = Path(final_path)
        self.tmp_path = self.final_path.with_name(self.final_path.name + ".tmp")
        self.page_size = check_page_size(page_size)
        self.data_start = data_start(num_source, self.page_size)
        self.meta: list[np.ndarray] = []
        self.alloc: list[np.ndarray] = []
        self._chunk_meta: list[tuple[int, int, int, int]] = []  # (width, height, ptr, label)
        self._chunk_sizes: list[int] = []
        self.num_samples = 0
        self.resumed = False
        try:
            if resume is not None and self.tmp_path.exists() and self.tmp_path.stat().st_size >= resume[0]:
                end, meta, alloc = resume
                self._f = open(self.tmp_path, "r+b")
                self._f.truncate(end)
                self.pos = end
                self.meta, self.alloc = [meta], [alloc]
                self.num_samples = len(meta)
                self.resumed = True
            else:
                self._f = open(self.tmp_path, "wb")
                self._f.truncate(self.data_start)
                self.pos = self.data_start
        except OSError as exc:
            raise DataError(f"cannot write {self.tmp_path}: {exc.strerror or exc}") from None
        self._f.seek(self.pos)

    def fits(self, size: int) -> bool:
        return size <= self.page_size

    def add(self, label: int, jpeg: bytes, width: int, height: int) -> None:
        """Place one JPEG: in the current page if it fits, else at the start of the next page."""
        size = len(jpeg)
        if size > self.page_size:
            raise ValueError(f"sample of {size} bytes does not fit a {self.page_size} byte page")
        used = (self.pos - self.data_start) % self.page_size
        if used and used + size > self.page_size:
            pad = self.page_size - used
            self._f.write(b"\0" * pad)
            self.pos += pad
        self._f.write(jpeg)
        self._chunk_meta.append((int(width), int(height), self.pos, int(label)))
        self._chunk_sizes.append(size)
        self.pos += size

    def checkpoint(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Flush (data first), fold pending samples in, return ``(file_end, meta, alloc)`` of this chunk."""
        self._f.flush()
        os.fsync(self._f.fileno())
        n = len(self._chunk_meta)
        meta = np.zeros(n, dtype=SAMPLE_META)
        alloc = np.zeros(n, dtype=ALLOC)
        if n:
            arr = np.array(self._chunk_meta, dtype=np.int64)
            meta["f0"]["mode"] = JPEG_MODE
            meta["f0"]["width"] = arr[:, 0]
            meta["f0"]["height"] = arr[:, 1]
            meta["f0"]["data_ptr"] = arr[:, 2]
            meta["f1"] = arr[:, 3]
            alloc["sample_id"] = np.arange(self.num_samples, self.num_samples + n)
            alloc["ptr"] = arr[:, 2]
            alloc["size"] = np.array(self._chunk_sizes, dtype=np.uint64)
        self.meta.append(meta)
        self.alloc.append(alloc)
        self.num_samples += n
        self._chunk_meta, self._chunk_sizes = [], []
        return self.pos, meta, alloc

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> dict[str, Any]:
        """Pad the last page, append the allocation table, write header + metadata, rename."""
        if self._chunk_meta:
            self.checkpoint()
        used = (self.pos - self.data_start) % self.page_size
        if used:
            self._f.write(b"\0" * (self.page_size - used))
            self.pos += self.page_size - used
        alloc, meta = join_rows(self.alloc, ALLOC), join_rows(self.meta, SAMPLE_META)
        table_ptr = self.pos
        self._f.write(alloc.tobytes())
        header = np.zeros(1, dtype=HEADER)
        header["version"] = BETON_VERSION
        header["num_fields"] = len(FIELDS)
        header["page_size"] = self.page_size
        header["num_samples"] = len(meta)
        header["alloc_table_ptr"] = table_ptr
        descs = np.zeros(len(FIELDS), dtype=FIELD_DESC)
        for i, (name, type_id) in enumerate(FIELDS):
            descs[i]["type_id"] = type_id
            raw = np.frombuffer(name.encode("ascii"), dtype="<u1")
            descs[i]["name"][: len(raw)] = raw
        self._f.seek(0)
        self._f.write(header.tobytes() + descs.tobytes() + meta.tobytes())
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        size = self.tmp_path.stat().st_size
        sha = _sha256(self.tmp_path)
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return {
            "path": self.final_path.name,
            "index": None,
            "num_samples": int(len(meta)),
            "bytes": size,
            "sha256": sha,
            "page_size": self.page_size,
        }

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_beton_tables(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, list[tuple[int, str]], np.ndarray, np.ndarray]:
    """``(header, [(type_id, name)], metadata, alloc table)`` of a beton, without ffcv; ValueError if bad."""
    size = os.path.getsize(path)
    if size < metadata_start():
        raise ValueError(f"file is {size} bytes, shorter than a beton header")
    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    if int(header["version"]) != BETON_VERSION:
        raise ValueError(f"beton version {int(header['version'])}, expected {BETON_VERSION}")
    nf = int(header["num_fields"])
    descs = np.fromfile(path, dtype=FIELD_DESC, count=nf, offset=HEADER.itemsize)
    fields = [
        (int(d["type_id"]), d["name"].tobytes().split(b"\0")[0].decode("ascii", "replace")) for d in descs
    ]
    if [(t, n) for t, n in fields] != [(t, n) for n, t in FIELDS]:
        raise ValueError(f"fields {fields} are not image (RGBImageField) + label (IntField)")
    n = int(header["num_samples"])
    meta_end = HEADER.itemsize + nf * FIELD_DESC.itemsize + n * SAMPLE_META.itemsize
    table_ptr = int(header["alloc_table_ptr"])
    if meta_end > size or table_ptr > size or (size - table_ptr) % ALLOC.itemsize:
        raise ValueError(
            f"file of {size} bytes is truncated (metadata ends at {meta_end}, "
            f"allocation table at {table_ptr})"
        )
    meta = np.fromfile(path, dtype=SAMPLE_META, count=n, offset=HEADER.itemsize + nf * FIELD_DESC.itemsize)
    alloc = np.fromfile(path, dtype=ALLOC, offset=table_ptr)
    return header, fields, meta, alloc


# ----------------------------------------------------------------------------- reading
class _BetonSamples(Sequence):
    """``(pseudo path, label)`` per sample, built on demand (no million-entry list)."""

    def __init__(self, beton: str, labels: np.ndarray) -> None:
        self.beton, self.labels = beton, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return f"{self.beton}#{int(i)}", int(self.labels[i])


@dataclass
class BetonIndex(ImageFolderIndex):
    """An :class:`ImageFolderIndex` over a ``.beton``: ``root`` is the split folder, labels from metadata."""

    beton: str = ""
    labels: np.ndarray | None = None
    widths: np.ndarray | None = None
    heights: np.ndarray | None = None

    def path(self, i: int) -> str:
        return f"{self.beton}#{int(i)}"

    def label(self, i: int) -> int:
        return int(self.labels[i])  # type: ignore[index]


def open_beton_index(source: str | os.PathLike[str]) -> BetonIndex:
    """A :class:`BetonIndex` for a prepared beton split folder, its ``manifest.json`` or the ``.beton``."""
    p = Path(source)
    classes: list[str] | None = None
    if p.suffix == ".beton":
        beton = p
        if (p.parent / MANIFEST_NAME).exists():
            classes = read_manifest(p.parent)["classes"]
    else:
        m = read_manifest(p)
        if m["format"] != "beton":
            raise DataError(
                f"{p} holds a {m['format']} dataset; the ffcv backend reads beton "
                "(swav-fast prepare --format beton)"
            )
        beton = Path(shard_paths(p, m)[0][0])
        classes = m["classes"]
    if not beton.is_file():
        raise DataError(f"beton file not found: {beton}")
    try:
        _, _, meta, _ = read_beton_tables(beton)
    except (OSError, ValueError) as exc:
        raise DataError(f"{beton} is not a readable beton: {exc}") from None
    labels = meta["f1"].astype(np.int64)
    if classes is None:
        classes = [str(k) for k in range(int(labels.max(initial=-1)) + 1)]
    if len(labels) == 0:
        raise DataError(f"{beton} holds no samples")
    return BetonIndex(
        root=str(beton.parent),
        classes=list(classes),
        samples=_BetonSamples(str(beton), labels),
        beton=str(beton),
        labels=labels,
        widths=meta["f0"]["width"].astype(np.int64),
        heights=meta["f0"]["height"].astype(np.int64),
    )


class BetonSource:
    """Random access to ``(JPEG bytes, label)`` of a prepared beton (the ``SampleSource`` protocol of
    :mod:`pipelines.formats.sources`), without ffcv: the evaluation readers use it."""

    format = "beton"

    def __init__(self, source: str | os.PathLike[str]) -> None:
        self.index = open_beton_index(source)
        self.root, self.classes = self.index.root, list(self.index.classes)
        _, _, _, alloc = read_beton_tables(self.index.beton)
        order = np.argsort(alloc["sample_id"], kind="stable")
        self._ptr = alloc["ptr"][order].astype(np.int64)
        self._size = alloc["size"][order].astype(np.int64)
        if len(self._ptr) != len(self.index.labels):  # type: ignore[arg-type]
            raise DataError(f"{self.index.beton}: the allocation table does not list every sample once")
        self._f: Any = None

    def __len__(self) -> int:
        return len(self._ptr)

    def read(self, i: int) -> tuple[bytes, int]:
        if self._f is None:
            self._f = open(self.index.beton, "rb")
        self._f.seek(int(self._ptr[i]))
        data = self._f.read(int(self._size[i]))
        if len(data) != int(self._size[i]):
            raise BadImage(f"{self.index.beton} is truncated at sample {i}")
        return data, self.index.label(i)

    def name(self, i: int) -> str:
        return self.index.path(i)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own file
        return {**self.__dict__, "_f": None}

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
