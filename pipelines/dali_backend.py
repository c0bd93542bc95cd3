"""The ``dali`` loader backend: NVIDIA DALI decodes each image once and cuts every view from it.

One batch of ``B`` samples and ``V`` views goes through three stages:

1. host, in a feeder thread: read the encoded bytes in the base class's order, check each file's
   header and take the image size from it, draw the crop boxes, flips and colour parameters;
2. DALI: ``decoders.image`` (``mixed``: nvJPEG with the hardware JPEG decoder on the GPU; ``cpu``
   otherwise) decodes each image once, then one ``resize`` per view, with the view's region of
   interest, crops, resizes and flips it (uint8, HWC);
3. torch: the views of one crop size go through :func:`pipelines.gpu_aug.augment_views` in one call
   (colour jitter + grayscale as a per-sample 3x3 matrix and offset, blur, solarize, normalise;
   the spec's dtype and memory format).  Outputs stay on the loader's device.

*Order and randomness.*  Every format goes through ``fn.external_source`` fed in the base class's
order (:meth:`MultiCropLoader.batch_indices`): the same ``(seed, epoch)`` permutation, rank striding,
``set_epoch(epoch, start_batch)`` resume and bad-sample accounting as the ``pil`` backend, for an
ImageFolder, TFRecord shards and webdataset tars alike.  The sample bytes are read by random access
(files; TFRecord records and tar members located through their DALI index files), so DALI's own
readers, whose shuffle is a bounded buffer and whose shards are contiguous ranges that cannot resume
mid-epoch, are not needed.  Crop boxes, flips and colour parameters are drawn on the host by
:func:`pipelines.params.sample_params_for_indices` (torchvision ``RandomResizedCrop`` semantics: area
fraction ``s ~ U[min, max]``, aspect ratio ``log r ~ U[log r0, log r1]``, 10 tries, then a centre
crop), a function of ``(seed, epoch, sample index, view)`` shared by every backend, using the image
size read from the file header, and fed to DALI as per-sample inputs (DALI's own generator is not
used).  A flip is a reversed ROI in
``fn.resize`` (``roi_start.x > roi_end.x``), so crop, resize and flip are one DALI operator per view.

*Bad files.*  DALI fails a whole batch (and its pipeline) on one undecodable file, so every file is
checked on the host first (known format, dimensions in the header, JPEG end-of-image / PNG ``IEND``
present, under :data:`pipelines.pil.MAX_PIXELS`); a failing file is replaced by the next good
sample, logged once and counted (``num_bad``, ``bad_paths``) exactly as in the ``pil`` backend.  A
file that passes the check but still fails in DALI is found by decoding the in-flight batches one
image at a time, marked bad, and the pipeline is rebuilt and re-fed from the failed batch.

``nvidia.dali`` is imported lazily: ``import pipelines`` works without it; building a ``dali``
loader without it raises :class:`~swav_fast.errors.ConfigError` naming the ``dali`` extra.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import mmap
import os
import queue
import tarfile
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from pipelines.errors import ConfigError, DataError, SwavFastError

from . import gpu_aug
from .exif import jpeg_orientation, oriented_size
from .folder import MANIFEST_NAME, ImageFolderIndex, is_prepared_manifest, scan_image_folder
from .loader import MultiCropBatch, MultiCropLoader, register_backend
from .options import DaliOptions
from .params import BatchViewParams, concat_params, sample_params_for_indices
from .pil import MAX_PIXELS, MAX_REPLACEMENTS
from .spec import MultiCropSpec

log = logging.getLogger("pipelines")

#: Default share of JPEG decoding given to the hardware decoder (A100/H100) in ``mixed`` mode.
DEFAULT_HW_DECODER_LOAD = DaliOptions.hw_decoder_load
#: How many times one pass may rebuild the pipeline after a decode failure before giving up (each
#: rebuild follows at least one newly found bad file; the host-side check catches the usual ones).
MAX_RECOVERIES = 256
#: A JPEG's end-of-image marker is looked for in this many trailing bytes (some writers pad files).
_JPEG_TAIL = 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (they carry the image size): C0-CF except DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# -- optional dependency -------------------------------------------------------------------------
def import_dali() -> Any:
    """``nvidia.dali`` (imported on first use); ConfigError with the install hint when it is missing."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "data.loader=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130==2.4.0); "
            f"import failed: {e}") from e
    return dali


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        import_dali()
    except ConfigError:
        return False
    return True


# -- encoded-image check -------------------------------------------------------------------------
class BadImage(ValueError):
    """An encoded image that must not reach the decoder (the message names the reason)."""


def image_size(buf: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header of an encoded image, after cheap integrity checks.

    JPEG: the first start-of-frame segment, found by walking the marker segments from SOI, and an
    end-of-image marker within the last 4 KB (a truncated file has none).  PNG: the IHDR chunk and
    a final IEND chunk.  Other formats: PIL's header parser.  Raises :class:`BadImage`.
    """
    n = len(buf)
    if n == 0:
        raise BadImage("empty file")
    if buf[:2] == b"\xff\xd8":
        w, h = _jpeg_size(buf)
    elif buf[:8] == _PNG_SIGNATURE:
        if n < 33 or buf[12:16] != b"IHDR":
            raise BadImage("PNG without an IHDR chunk")
        if buf.rfind(b"IEND", max(0, n - 16)) < 0:
            raise BadImage("truncated PNG (no IEND chunk)")
        w, h = int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    else:
        w, h = _other_size(buf)
    if w <= 0 or h <= 0:
        raise BadImage(f"invalid image size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise BadImage(f"{w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit")
    return w, h


def _jpeg_size(buf: bytes) -> tuple[int, int]:
    n = len(buf)
    if buf.rfind(b"\xff\xd9", max(0, n - _JPEG_TAIL)) < 0:
        raise BadImage("truncated JPEG (no end-of-image marker)")
    i = 2
    while i + 4 <= n:
        if buf[i] != 0xFF:
            raise BadImage(f"corrupt JPEG header (no marker at byte {i})")
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if length < 2:
            raise BadImage(f"corrupt JPEG header (segment length {length} at byte {i})")
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            return (buf[i + 7] << 8) | buf[i + 8], (buf[i + 5] << 8) | buf[i + 6]
        if marker == 0xDA:
            raise BadImage("JPEG scan before any frame header")
        i += 2 + length
    raise BadImage("JPEG without a frame header")


def _other_size(buf: bytes) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(buf)) as im:
            return int(im.width), int(im.height)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
        raise BadImage(f"not a readable image ({type(e).__name__}: {e})") from e


# -- random-access sample sources ----------------------------------------------------------------
class SampleSource(Protocol):
    """Random access to ``(encoded image bytes, label)`` by global sample index."""

    root: str
    classes: list[str]

    def __len__(self) -> int: ...

    def read(self, i: int) -> tuple[bytes, int]:
        """Encoded bytes and label of sample ``i``; raises :class:`BadImage` for an unreadable record."""
        ...

    def name(self, i: int) -> str:
        """A human-readable location of sample ``i`` (file path, or ``shard#key``) for logs and reports."""
        ...


class ImageFolderSource:
    """An ImageFolder (from :func:`pipelines.folder.scan_image_folder`): one file per sample."""

    def __init__(self, index: ImageFolderIndex) -> None:
        self.root = index.root
        self.classes = list(index.classes)
        self._index = index
        self._labels = np.array([c for _, c in index.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def read(self, i: int) -> tuple[bytes, int]:
        path = self._index.path(i)
        try:
            with open(path, "rb") as f:
                return f.read(), int(self._labels[i])
        except OSError as e:
            raise BadImage(f"cannot read file ({e.strerror or e})") from e

    def name(self, i: int) -> str:
        return self._index.path(i)


class _ShardedSource:
    """Shared by the TFRecord and webdataset sources: memory-mapped shards and per-sample locations."""

    root: str
    classes: list[str]
    #: per sample: shard number, and (offset, size) of the payload(s) inside the shard
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

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


class TFRecordSource(_ShardedSource):
    """TFRecord shards of ``tf.train.Example`` records (``image/encoded``, ``image/class/label``).

    Records are located through DALI's ``tfrecord2idx`` index files (``offset size`` per line, ``size``
    the whole framed record: 8-byte length, 4-byte CRC, payload, 4-byte CRC).  A missing index is
    rebuilt in memory by walking the record headers.
    """

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        shards, offsets, sizes, paths = [], [], [], []
        for k, sh in enumerate(_manifest_shards(manifest, root)):
            path = os.path.join(root, sh["path"])
            idx = os.path.join(root, sh["index"]) if sh.get("index") else None
            table = _read_tfrecord_index(idx) if idx and os.path.exists(idx) else _scan_tfrecord(path, idx)
            _check_count(path, len(table), sh.get("num_samples"))
            paths.append(path)
            shards.append(np.full(len(table), k, dtype=np.int64))
            offsets.append(table[:, 0])
            sizes.append(table[:, 1])
        self._paths = paths
        self._shard = np.concatenate(shards) if shards else np.zeros(0, np.int64)
        self._offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self._size = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)

    def read(self, i: int) -> tuple[bytes, int]:
        mm = self._view(int(self._shard[i]))
        off, size = int(self._offset[i]), int(self._size[i])
        if off + size > len(mm) or size < 16:
            raise BadImage(f"record {off}+{size} lies outside the shard ({len(mm)} bytes): truncated shard?")
        length = int.from_bytes(mm[off:off + 8], "little")
        if length + 16 != size:
            raise BadImage(f"record length {length} does not match the index entry ({size} bytes framed)")
        features = parse_example(mm[off + 12:off + 12 + length])
        image = features.get("image/encoded")
        label = features.get("image/class/label")
        if not isinstance(image, list) or not image or not isinstance(image[0], bytes):
            raise BadImage("record has no image/encoded bytes")
        if not isinstance(label, list) or not label or not isinstance(label[0], int):
            raise BadImage("record has no image/class/label int64")
        return image[0], self._check_label(label[0])

    def name(self, i: int) -> str:
        shard = int(self._shard[i])
        first = int(np.searchsorted(self._shard, shard))
        return f"{self._paths[shard]}#{i - first}"


class WebDatasetSource(_ShardedSource):
    """webdataset tars with ``<key>.jpg`` (image) and ``<key>.cls`` (ASCII decimal label) per sample.

    Members are located through DALI's ``wds2idx`` index (v1.2: a ``v1.2 <count>`` line, then one
    line per sample of ``ext offset size name`` groups); a missing index is rebuilt by reading the
    tar headers.
    """

    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        shards, tables, keys, paths = [], [], [], []
        for k, sh in enumerate(_manifest_shards(manifest, root)):
            path = os.path.join(root, sh["path"])
            idx = os.path.join(root, sh["index"]) if sh.get("index") else None
            members = _read_wds_index(idx) if idx and os.path.exists(idx) else _scan_tar(path, idx)
            table, names = _wds_table(members, path)
            _check_count(path, len(table), sh.get("num_samples"))
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
        text = mm[cls_off:cls_off + cls_size].strip()
        try:
            label = int(text)
        except ValueError as e:
            raise BadImage(f"label {text[:20]!r} is not an ASCII integer") from e
        return mm[img_off:img_off + img_size], self._check_label(label)

    def name(self, i: int) -> str:
        return f"{self._paths[int(self._shard[i])]}#{self._keys[i]}"


def _manifest_shards(manifest: dict[str, Any], root: str) -> list[dict[str, Any]]:
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"manifest in {root} lists no shards")
    for sh in shards:
        if not isinstance(sh, dict) or not isinstance(sh.get("path"), str):
            raise DataError(f"manifest in {root} has a shard entry without a path: {sh!r}")
        if not os.path.exists(os.path.join(root, sh["path"])):
            raise DataError(f"shard {os.path.join(root, sh['path'])} listed in the manifest is missing")
    return shards


def _check_count(path: str, found: int, expected: Any) -> None:
    if expected is not None and int(expected) != found:
        raise DataError(f"shard {path} holds {found} samples but the manifest says {expected}")


def _read_tfrecord_index(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            values = np.array(f.read().split(), dtype=np.int64)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot parse TFRecord index {path}: {e}") from e
    if len(values) % 2:
        raise DataError(f"TFRecord index {path} is malformed (odd number of fields)")
    return values.reshape(-1, 2)


def _scan_tfrecord(path: str, idx: str | None) -> np.ndarray:
    log.warning("TFRecord index %s is missing; scanning %s (run tfrecord2idx to avoid this)", idx, path)
    rows = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + 12 <= size:
            f.seek(pos)
            length = int.from_bytes(f.read(8), "little")
            framed = length + 16
            if pos + framed > size:
                log.warning("%s ends in a truncated record at byte %d; ignoring it", path, pos)
                break
            rows.append((pos, framed))
            pos += framed
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _read_wds_index(path: str) -> list[list[tuple[str, int, int, str]]]:
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


def _scan_tar(path: str, idx: str | None) -> list[list[tuple[str, int, int, str]]]:
    log.warning("webdataset index %s is missing; reading the headers of %s (run wds2idx to avoid this)",
                idx, path)
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                dot = m.name.find(".", m.name.rfind("/") + 1)
                if dot <= 0:
                    continue
                stem, ext = m.name[:dot], m.name[dot + 1:]
                if stem != last:
                    samples.append([])
                    last = stem
                samples[-1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot read webdataset shard {path}: {e}") from e
    return samples


def _wds_table(members: list[list[tuple[str, int, int, str]]], path: str) -> tuple[np.ndarray, list[str]]:
    table = np.zeros((len(members), 4), dtype=np.int64)
    keys = []
    for k, sample in enumerate(members):
        parts = {ext.lower(): (off, size, name) for ext, off, size, name in sample}
        img = next((parts[e] for e in WebDatasetSource.IMAGE_EXTS if e in parts), None)
        cls = parts.get("cls")
        if img is None or cls is None:
            name = sample[0][3] if sample else f"#{k}"
            raise DataError(f"webdataset shard {path}: sample {name} lacks a .jpg or .cls member")
        table[k] = (img[0], img[1], cls[0], cls[1])
        keys.append(img[2].rsplit(".", 1)[0])
    return table, keys


def read_prepared_manifest(root: str) -> dict[str, Any]:
    """The manifest of a prepared split folder (``swav_fast.prepare.read_manifest`` when present)."""
    try:
        from swav_fast.prepare import read_manifest  # type: ignore[attr-defined]
    except ImportError:
        path = os.path.join(root, "manifest.json")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
    return read_manifest(root)


def open_source(source: str | os.PathLike[str] | ImageFolderIndex | SampleSource) -> SampleSource:
    """A sample source for an ImageFolder (path or index) or a prepared TFRecord / webdataset split folder."""
    if isinstance(source, ImageFolderIndex):
        return ImageFolderSource(source)
    if not isinstance(source, (str, os.PathLike)):
        return source
    root = os.path.abspath(os.fspath(source))
    # a prepare manifest is recognised by its content: an ImageFolder may hold a foreign manifest.json
    prepared = [os.path.join(root, *sub, MANIFEST_NAME) for sub in ((), ("train",), ("val",))]
    if not any(is_prepared_manifest(p) for p in prepared):
        return ImageFolderSource(scan_image_folder(root))
    manifest = read_prepared_manifest(root)
    fmt = manifest.get("format")
    if fmt == "tfrecord":
        src: SampleSource = TFRecordSource(root, manifest)
    elif fmt == "wds":
        src = WebDatasetSource(root, manifest)
    elif fmt == "beton":
        raise ConfigError(f"{root} holds an FFCV .beton dataset; read it with data.loader=ffcv")
    else:
        raise DataError(f"{root}/manifest.json: unknown format {fmt!r} (expected tfrecord or wds)")
    if manifest.get("num_samples") is not None and int(manifest["num_samples"]) != len(src):
        raise DataError(f"{root}: the shards hold {len(src)} samples but the manifest says "
                        f"{manifest['num_samples']}")
    if not len(src):
        raise DataError(f"{root}: the prepared dataset holds no samples")
    return src


# -- minimal protobuf (tf.train.Example) reader --------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise BadImage("truncated protobuf varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise BadImage("protobuf varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of a protobuf message: ints for varints, bytes for LEN."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > n:
                raise BadImage("truncated protobuf field")
            value, i = buf[i:i + size], i + size
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise BadImage(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_example(buf: bytes) -> dict[str, list[Any]]:
    """The ``bytes_list`` and ``int64_list`` features of a serialized ``tf.train.Example``.

    ``Example{1: Features{1: map<string, Feature>}}``, ``Feature{1: BytesList, 2: FloatList,
    3: Int64List}``; packed and unpacked int64 lists are both read; float lists are skipped.
    """
    out: dict[str, list[Any]] = {}
    for num, wire, features in _fields(buf):
        if num != 1 or wire != 2:
            continue
        for enum, ewire, entry in _fields(features):
            if enum != 1 or ewire != 2:
                continue
            key, feature = None, b""
            for knum, kwire, kval in _fields(entry):
                if knum == 1 and kwire == 2:
                    key = bytes(kval).decode("utf-8", "replace")
                elif knum == 2 and kwire == 2:
                    feature = kval
            if key is None:
                continue
            values: list[Any] = []
            for fnum, fwire, lst in _fields(feature):
                if fwire != 2 or fnum not in (1, 3):
                    continue
                for vnum, vwire, v in _fields(lst):
                    if vnum != 1:
                        continue
                    if fnum == 1 and vwire == 2:
                        values.append(bytes(v))
                    elif fnum == 3 and vwire == 0:
                        values.append(_int64(v))
                    elif fnum == 3 and vwire == 2:  # packed
                        j = 0
                        while j < len(v):
                            x, j = _varint(v, j)
                            values.append(_int64(x))
            out[key] = values
    return out


# -- host-side batch preparation -----------------------------------------------------------------
@dataclass
class _Planned:
    """A batch as planned by the base class: its epoch, number within the epoch and sample indices."""

    epoch: int
    number: int
    indices: np.ndarray


@dataclass
class _Issued:
    """A batch handed to DALI: what the consumer needs once its outputs come back."""

    plan: _Planned
    serial: int
    sources: np.ndarray  # the sample actually used for each requested index (replacement or itself)
    labels: np.ndarray
    ok: np.ndarray
    bad_paths: list[str]
    params: list[BatchViewParams]
    rois: list[np.ndarray] = field(repr=False, default_factory=list)  # per sample [V, 4], see crop_rois
    encoded: list[np.ndarray] = field(repr=False, default_factory=list)


def crop_rois(p: BatchViewParams) -> np.ndarray:
    """``[B, 4]`` float32 ``(y0, x0, y1, x1)`` in source pixels; ``x0 > x1`` (reversed) for a flip."""
    x0 = p.left.astype(np.float32)
    x1 = (p.left + p.width).astype(np.float32)
    y0 = p.top.astype(np.float32)
    y1 = (p.top + p.height).astype(np.float32)
    return np.stack([y0, np.where(p.flip, x1, x0), y1, np.where(p.flip, x0, x1)], axis=1)


class _End:
    """End-of-pass marker in the feeder queue."""


class _Feeder:
    """Prepares planned batches (read, check, draw) in a background thread, in order, ``depth`` ahead.

    File reads release the GIL, so this overlaps with the training step and with DALI's own work.
    :meth:`get` returns the next batch, raises StopIteration at the end of the plans, and re-raises
    an error of the preparing thread.
    """

    def __init__(self, prepare: Callable[[_Planned], _Issued], plans: Sequence[_Planned], depth: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(prepare, list(plans)), daemon=True,
                                        name="dali-loader-feeder")
        self._thread.start()

    def _run(self, prepare: Callable[[_Planned], _Issued], plans: list[_Planned]) -> None:
        try:
            for plan in plans:
                if self._stop.is_set():
                    return
                self._put(prepare(plan))
            self._put(_End())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self) -> _Issued:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def stop(self) -> None:
        """Stop preparing and discard what was prepared."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


# -- the DALI graph ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeOptions:
    """DALI pipeline settings (device, threads, queue depth, decoder tuning)."""

    device_id: int | None
    num_threads: int
    prefetch: int
    hw_decoder_load: float
    sizes: tuple[int, ...]

    @property
    def decoder_device(self) -> str:
        return "cpu" if self.device_id is None else "mixed"


def build_pipeline(opts: DecodeOptions, batch_size: int, source: Callable[[], Any]) -> Any:
    """Decode once, then one ``resize`` per view with its ROI (crop + flip) to ``S_v x S_v``, uint8 HWC.

    Outputs: ``serial`` (int64 [1] per sample, to pair outputs with the host's batch record), then
    the views in order.
    """
    dali = import_dali()
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=opts.num_threads, device_id=opts.device_id,
                         prefetch_queue_depth=opts.prefetch, exec_async=True, exec_pipelined=True)
    with pipe:
        encoded, rois, serial = fn.external_source(
            source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT, types.INT64],
            ndim=[1, 2, 1])
        # EXIF orientation applied, as by every loader (the ROIs are drawn on the turned size)
        decode_args: dict[str, Any] = {"device": opts.decoder_device, "output_type": types.RGB,
                                       "adjust_orientation": True}
        if opts.device_id is not None:
            decode_args["hw_decoder_load"] = opts.hw_decoder_load
        image = fn.decoders.image(encoded, **decode_args)
        views = [fn.resize(image, size=[s, s], roi_start=rois[v, 0:2], roi_end=rois[v, 2:4],
                           interp_type=types.INTERP_LINEAR, antialias=True)
                 for v, s in enumerate(opts.sizes)]
        pipe.set_outputs(serial, *views)
    pipe.build()
    return pipe


class _DecodeChecker:
    """Decodes one image at a time with the loader's decoder, to find the file a failed batch tripped on."""

    def __init__(self, opts: DecodeOptions) -> None:
        self.opts = opts
        self._pipe: Any = None

    def _build(self) -> Any:
        dali = import_dali()
        fn, types = dali.fn, dali.types
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=self.opts.device_id,
                             prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.image(encoded, device=self.opts.decoder_device,
                                               output_type=types.RGB, adjust_orientation=True))
        pipe.build()
        return pipe

    def decodes(self, buf: np.ndarray) -> bool:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.run(encoded=[buf])
            return True
        except Exception:  # noqa: BLE001 - any decoder error: this file is bad
            self._pipe = None  # a failed pipeline is not reusable
            return False


# -- the loader ----------------------------------------------------------------------------------
class DALILoader(MultiCropLoader):
    """Multi-crop loader on NVIDIA DALI; ``device="cuda"`` decodes with nvJPEG (+ HW decoder), CPU otherwise.

    ``source``: an ImageFolder (path or :class:`ImageFolderIndex`) or a prepared split folder
    (``manifest.json`` with ``format`` ``tfrecord`` or ``wds``).  ``threads`` is DALI's CPU thread
    count (0: ``num_workers``, at least 1); ``prefetch`` its queue depth; ``hw_decoder_load`` the share of JPEGs sent to the hardware
    JPEG decoder (GPU mode only).  Outputs stay on ``device``.
    """

    #: ``build_loader`` may hand over the source path unscanned (prepared folders are not ImageFolders).
    accepts_path = True

    def __init__(self, source: Any, spec: MultiCropSpec, batch_size: int, device: Any = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 4,
                 drop_last: bool = True, prefetch: int = DaliOptions.prefetch,
                 hw_decoder_load: float = DaliOptions.hw_decoder_load, threads: int = DaliOptions.threads) -> None:
        import_dali()
        self.source = open_source(source)
        # the base class needs only len(index) and index.classes, which every source has
        super().__init__(self.source, spec, batch_size, device, rank, world_size, seed,  # type: ignore
                         drop_last)
        if num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {num_workers}")
        DaliOptions(hw_decoder_load=hw_decoder_load, threads=threads, prefetch=prefetch)  # checks the values
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"dali loader: device {self.device} requested but CUDA is not available")
            device_id: int | None = (self.device.index if self.device.index is not None
                                     else torch.cuda.current_device())
            self.device = torch.device("cuda", device_id)
        elif self.device.type == "cpu":
            device_id = None
        else:
            raise ConfigError(f"dali loader: device must be cpu or cuda, got {self.device}")
        self.opts = DecodeOptions(device_id=device_id, num_threads=max(1, int(threads or num_workers)),
                                  prefetch=int(prefetch), hw_decoder_load=float(hw_decoder_load),
                                  sizes=tuple(spec.view_sizes))
        self._pipe: Any = None
        self._checker = _DecodeChecker(self.opts)
        self._plans: list[_Planned] = []  # this pass's batches
        self._feeder: _Feeder | None = None
        self._issued: deque[_Issued] = deque()  # handed to DALI, outputs not yet returned
        self._serial = 0
        self._active = False
        self._known_bad: set[int] = set()
        self._warned: set[int] = set()
        self._groups = _view_groups(spec)
        #: view v -> (its group, its position in the group)
        self._view_slots = [next((g, m.index(v)) for g, m in enumerate(self._groups) if v in m)
                            for v in range(spec.num_views)]

    # -- host side ------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """DALI's ``external_source`` callback: the next prepared batch (StopIteration at the end)."""
        if self._feeder is None:
            raise StopIteration
        issued = self._feeder.get()
        self._issued.append(issued)
        serial = np.array([issued.serial], dtype=np.int64)
        return issued.encoded, issued.rois, [serial] * len(issued.encoded)

    def _prepare(self, plan: _Planned) -> _Issued:
        """Read, check (replacing bad files) and draw the augmentation parameters of one batch."""
        n = len(self.source)
        encoded: list[np.ndarray] = []
        sizes = np.zeros((len(plan.indices), 2), dtype=np.int64)
        sources = np.zeros(len(plan.indices), dtype=np.int64)
        labels = np.zeros(len(plan.indices), dtype=np.int64)
        ok = np.ones(len(plan.indices), dtype=bool)
        bad_paths: list[str] = []
        for b, i in enumerate(plan.indices):
            for k in range(min(MAX_REPLACEMENTS, n)):
                j = (int(i) + k) % n
                if j not in self._known_bad:
                    try:
                        buf, label = self.source.read(j)
                        sizes[b] = oriented_size(*image_size(buf), jpeg_orientation(buf))  # as decoded
                        break
                    except BadImage as e:
                        self._mark_bad(j, str(e))
                bad_paths.append(self.source.name(j))
                ok[b] = False
            else:
                raise DataError(f"{min(MAX_REPLACEMENTS, n)} consecutive unreadable images from "
                                f"{self.source.name(int(i))}; is the dataset corrupt?")
            encoded.append(np.frombuffer(buf, dtype=np.uint8))
            sources[b], labels[b] = j, label
        params = sample_params_for_indices(self.spec, self.seed, plan.epoch, sources,
                                           sizes[:, 0], sizes[:, 1])
        rois = list(np.stack([crop_rois(p) for p in params], axis=1))  # B x [V, 4]
        self._serial += 1
        return _Issued(plan, self._serial, sources, labels, ok, bad_paths, params, rois, encoded)

    def _mark_bad(self, j: int, reason: str) -> None:
        self._known_bad.add(j)
        if j not in self._warned:
            self._warned.add(j)
            log.warning("skipping unreadable image %s (%s)", self.source.name(j), reason)

    # -- iteration -----------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = build_pipeline(self.opts, self.batch_size, self._next_batch)
        return self._pipe

    def _start_feeder(self, position: int) -> None:
        if self._feeder is not None:
            self._feeder.stop()
        self._feeder = _Feeder(self._prepare, self._plans[position:], depth=self.opts.prefetch + 2)

    def _stop_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.stop()
            self._feeder = None

    def _finish_pass(self) -> None:
        """End a pass left unfinished (consumer stopped early): discard the batches still in flight."""
        if not self._active:
            return
        self._stop_feeder()  # the callback now ends the pass
        if self._pipe is not None:
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                self._pipe.reset()
            except Exception:  # noqa: BLE001 - a failed pipeline is simply rebuilt
                self._pipe = None
        self._issued.clear()
        self._active = False

    def _iterate(self, epoch: int, batches: list[np.ndarray]) -> Iterator[MultiCropBatch]:
        for groups, issued in self._iterate_groups(epoch, batches):
            yield self._augment(groups, issued)

    def iterate_crops(self, epoch: int | None = None, start_batch: int | None = None
                      ) -> Iterator[tuple[list[torch.Tensor], _Issued]]:
        """Per view, the uint8 crops ``[B, 3, S, S]`` before colour, with their batch record (tests)."""
        epoch = self.epoch if epoch is None else epoch
        for groups, issued in self._iterate_groups(epoch, self.batch_indices(epoch, start_batch)):
            b = len(issued.labels)
            yield [groups[g][k * b:(k + 1) * b] for g, k in self._view_slots], issued

    def iterate_with_record(self, epoch: int | None = None, start_batch: int | None = None
                            ) -> Iterator[tuple[MultiCropBatch, _Issued]]:
        """The augmented batches with their batch record (augmentation parameters, sources), for tests."""
        epoch = self.epoch if epoch is None else epoch
        for groups, issued in self._iterate_groups(epoch, self.batch_indices(epoch, start_batch)):
            yield self._augment(groups, issued), issued

    def _iterate_groups(self, epoch: int, batches: list[np.ndarray]
                        ) -> Iterator[tuple[list[torch.Tensor], _Issued]]:
        """Run the pipeline over ``batches``: per crop size, its views' uint8 crops ``[n_g B, 3, S, S]``."""
        self._finish_pass()
        start = len(self) - len(batches)
        self._plans = [_Planned(epoch, start + k, b) for k, b in enumerate(batches)]
        self._issued.clear()
        self._active = True
        self._start_feeder(0)
        recoveries = 0
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            pipe = self._pipeline()
            try:
                # on CUDA the outputs are ordered on torch's stream: no host synchronisation
                outputs = pipe.run(stream) if stream is not None else pipe.run()
            except StopIteration:
                pipe.reset()
                self._stop_feeder()
                self._active = False
                return
            except SwavFastError:  # from the feeder (e.g. a run of unreadable files): not a decode error
                self._pipe = None
                self._stop_feeder()
                self._active = False
                raise
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses for decode errors
                recoveries += 1
                if recoveries > MAX_RECOVERIES:
                    raise DataError(f"DALI pipeline failed {recoveries} times in one pass; "
                                    f"last error: {e}") from e
                self._recover(e)
                continue
            issued = self._issued.popleft()
            serial = int(outputs[0].as_array()[0, 0])
            if serial != issued.serial:
                raise RuntimeError(f"dali loader: output batch {serial} does not match the expected "
                                   f"{issued.serial}")
            groups = self._gather(outputs[1:], len(issued.labels), stream)
            issued.encoded = []
            yield groups, issued

    def _recover(self, err: BaseException) -> None:
        """Find the undecodable files among the in-flight batches, then rebuild and re-feed them."""
        suspects = list(self._issued)
        found = 0
        for issued in suspects:
            for j, buf in zip(issued.sources, issued.encoded):
                if not self._checker.decodes(buf):
                    self._mark_bad(int(j), "DALI could not decode it")
                    found += 1
        self._pipe = None
        if not found:
            self._stop_feeder()
            self._active = False
            raise DataError(f"DALI pipeline failed and no image in the batch could be blamed: {err}") from err
        self._issued.clear()
        # re-prepare from the (oldest) failed batch on
        self._start_feeder(suspects[0].plan.number - self._plans[0].number)

    def _gather(self, views: Sequence[Any], b: int, stream: Any) -> list[torch.Tensor]:
        """Copy the views' DALI outputs (``[B, S, S, 3]`` uint8 each) into one torch buffer per crop size.

        Returns ``[n_g B, 3, S, S]`` per group (a permuted view of the HWC buffer: channels-last strides,
        which the augmentation keeps, so nothing is converted to NCHW and back). On CUDA the copies are
        ordered on ``stream`` (torch's current stream), whose handle DALI must get as a
        ``ctypes.c_void_p``: a plain int is read as stream 0.
        """
        out = []
        handle = ctypes.c_void_p(stream.cuda_stream) if stream is not None else None
        for members in self._groups:
            s = self.spec.view_sizes[members[0]]
            buf = torch.empty((len(members) * b, s, s, 3), dtype=torch.uint8, device=self.device)
            for k, v in enumerate(members):
                copy_dali_output(views[v], buf[k * b:(k + 1) * b], handle)
            out.append(buf.permute(0, 3, 1, 2))
        return out

    def _augment(self, groups: list[torch.Tensor], issued: _Issued) -> MultiCropBatch:
        """Colour jitter, grayscale, blur, solarize and normalisation: one batched call per crop size."""
        views: list[torch.Tensor] = [torch.empty(0)] * self.spec.num_views
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        b = len(issued.labels)
        for crops, members in zip(groups, self._groups):
            # host-side params: augment_views splits blurred / plain crops without a device sync
            params = gpu_aug.colour_params_from_batch(
                concat_params([issued.params[v] for v in members]), "cpu")
            out = gpu_aug.augment_views(crops, params, self.spec)
            for k, v in enumerate(members):
                views[v] = out[k * b:(k + 1) * b].contiguous(memory_format=fmt)
        non_blocking = self.device.type == "cuda"
        return MultiCropBatch(
            views=views,
            labels=torch.from_numpy(issued.labels).to(self.device, non_blocking=non_blocking),
            indices=torch.from_numpy(issued.plan.indices.astype(np.int64)).to(self.device,
                                                                              non_blocking=non_blocking),
            num_bad=int((~issued.ok).sum()),
            bad_paths=list(issued.bad_paths),
            params=list(issued.params) if self.record_params else None)

    def close(self) -> None:
        self._stop_feeder()
        self._issued.clear()
        self._pipe = None
        self._checker = _DecodeChecker(self.opts)
        self._active = False
        if isinstance(self.source, _ShardedSource):
            self.source.close()


def copy_dali_output(tl: Any, dst: torch.Tensor, stream: ctypes.c_void_p | None = None) -> None:
    """Copy a DALI TensorList of ``B`` samples ``[S, S, 3]`` into the contiguous ``dst`` ``[B, S, S, 3]``.

    A dense output goes in one ``copy_to_external``; a non-contiguous one (samples in separate
    allocations) sample by sample. ``stream``: on the GPU, the ``ctypes.c_void_p`` handle of the stream
    the copies are ordered on (asynchronous: no host synchronisation); None on the CPU.
    """
    if not dst.is_contiguous():
        raise ValueError("copy_dali_output needs a contiguous destination")
    expected = list(dst.shape[1:])
    shapes = [list(sh) for sh in tl.shape()]
    if len(shapes) != dst.shape[0] or any(sh != expected for sh in shapes):
        raise RuntimeError(f"dali loader: a view came out {shapes[:3]}{'...' if len(shapes) > 3 else ''} "
                           f"({len(shapes)} samples), expected {dst.shape[0]} x {expected}")

    def copy(src: Any, ptr: int) -> None:
        if stream is not None:
            src.copy_to_external(ctypes.c_void_p(ptr), stream, non_blocking=True)
        else:
            src.copy_to_external(ctypes.c_void_p(ptr))

    if tl.is_dense_tensor():
        copy(tl.as_tensor(), dst.data_ptr())
        return
    step = dst[0].numel() * dst.element_size()
    for i in range(len(shapes)):
        copy(tl[i], dst.data_ptr() + i * step)


def _view_groups(spec: MultiCropSpec) -> list[list[int]]:
    """View indices grouped by output size (views of one size are augmented in one call)."""
    groups: dict[int, list[int]] = {}
    for v, s in enumerate(spec.view_sizes):
        groups.setdefault(s, []).append(v)
    return list(groups.values())


register_backend("dali", DALILoader, options=DaliOptions, formats=("folder", "tfrecord", "wds"))
