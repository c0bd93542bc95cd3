"""TFRecord shards of ``tf.train.Example`` records: one writer, one reader, one index format.

TFRecord framing (one record)::

    uint64 length | uint32 masked_crc32c(length) | payload | uint32 masked_crc32c(payload)

with ``masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8  (mod 2^32)`` and CRC-32C (Castagnoli).
The payload is a ``tf.train.Example``: ``image/encoded`` (bytes_list, the JPEG), ``image/class/label``
(int64_list) and ``image/index`` (int64_list).  The index next to each shard is DALI's
``tfrecord2idx`` format: one ``offset size`` line per record (``size`` the whole framed record).

No TensorFlow and no protobuf dependency: the formats are small enough to write and parse by hand
(one varint / field implementation below), and writing them here keeps the output byte-for-byte
deterministic.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import IO, Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np

from pipelines.errors import DataError

from .probe import BadImage
from .shardfile import ShardedSource, ShardWriter, check_count, manifest_shards

log = logging.getLogger("pipelines")

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- CRC-32C
def _crc32c_table() -> list[int]:
    poly = 0x82F63B78  # reversed Castagnoli polynomial
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


def _crc32c_python(data: bytes) -> int:
    """Table-driven CRC-32C: correct but ~10 MB/s; used only when no C implementation is installed."""
    table = _TABLE
    crc = _U32
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def _load_crc32c() -> Callable[[bytes], int]:
    try:
        import crc32c as _c  # type: ignore[import-not-found]

        return _c.crc32c
    except ImportError:
        pass
    try:
        import google_crc32c as _g  # type: ignore[import-not-found]

        return lambda data: int(_g.value(bytes(data)))
    except ImportError:
        pass
    return _crc32c_fallback


_warned = False


def _crc32c_fallback(data: bytes) -> int:
    """The table-driven CRC when no C package is installed (the GPU machine's image has none): the
    package is optional, needed only for speed when TFRecords are written or checked; says so once."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("no C CRC-32C implementation found (pip install crc32c); TFRecord CRCs are computed in "
                    "pure Python (~10 MB/s)")
    return _crc32c_python(data)


_TABLE = _crc32c_table()
crc32c: Callable[[bytes], int] = _load_crc32c()


def masked_crc32c(data: bytes) -> int:
    """The CRC that TFRecord stores: CRC-32C rotated right by 15 bits plus a constant (mod 2^32)."""
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & _U32) + _MASK_DELTA) & _U32


# ----------------------------------------------------------------------------- framing
def tfrecord_frame(payload: bytes) -> bytes:
    """One TFRecord record around ``payload`` (length, its CRC, payload, payload CRC)."""
    n = struct.pack("<Q", len(payload))
    return b"".join(
        (n, struct.pack("<I", masked_crc32c(n)), payload, struct.pack("<I", masked_crc32c(payload)))
    )


def iter_tfrecord_offsets(fp: IO[bytes], file_size: int, check_crc: bool = False) -> Iterator[tuple[int, int]]:
    """Walk a TFRecord file by seeking: ``(offset, record size)`` per record.

    Raises ``ValueError`` on a truncated record or (``check_crc``) a bad length CRC.
    """
    pos = 0
    while pos < file_size:
        if file_size - pos < 12:
            raise ValueError(f"truncated record header at byte {pos} ({file_size - pos} bytes left)")
        fp.seek(pos)
        head = fp.read(12)
        (length,) = struct.unpack("<Q", head[:8])
        if check_crc and struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
            raise ValueError(f"bad length CRC in the record at byte {pos}")
        size = 16 + length
        if pos + size > file_size:
            raise ValueError(f"truncated record at byte {pos}: needs {size} bytes, {file_size - pos} left")
        yield pos, size
        pos += size


def read_tfrecord_payload(fp: IO[bytes], offset: int, size: int, check_crc: bool = True) -> bytes:
    """The payload of the record at ``offset`` (CRC-checked unless ``check_crc`` is False)."""
    fp.seek(offset)
    rec = fp.read(size)
    if len(rec) != size:
        raise ValueError(f"record at byte {offset} is truncated")
    (length,) = struct.unpack("<Q", rec[:8])
    if length != size - 16:
        raise ValueError(f"record at byte {offset}: length field {length} does not match size {size}")
    payload = rec[12:12 + length]
    if check_crc:
        if struct.unpack("<I", rec[8:12])[0] != masked_crc32c(rec[:8]):
            raise ValueError(f"record at byte {offset}: bad length CRC")
        if struct.unpack("<I", rec[12 + length:])[0] != masked_crc32c(payload):
            raise ValueError(f"record at byte {offset}: bad data CRC")
    return payload


# ----------------------------------------------------------------------------- index
def format_index_line(offset: int, size: int) -> str:
    """One ``tfrecord2idx`` line."""
    return f"{offset} {size}\n"


def read_tfrecord_index(path: str) -> np.ndarray:
    """``[N, 2]`` int64 ``(offset, framed size)`` from a ``tfrecord2idx`` file (DataError if malformed)."""
    try:
        with open(path, "rb") as f:
            values = np.array(f.read().split(), dtype=np.int64)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot parse TFRecord index {path}: {e}") from e
    if len(values) % 2:
        raise DataError(f"TFRecord index {path} is malformed (odd number of fields)")
    return values.reshape(-1, 2)


def scan_tfrecord(path: str, idx: str | None = None) -> np.ndarray:
    """The index of ``path`` rebuilt by walking its record headers (a truncated last record is dropped)."""
    log.warning("TFRecord index %s is missing; scanning %s (run tfrecord2idx to avoid this)", idx, path)
    rows: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        try:
            for row in iter_tfrecord_offsets(f, os.fstat(f.fileno()).st_size):
                rows.append(row)
        except ValueError as e:
            log.warning("%s ends in a truncated record (%s); ignoring it", path, e)
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- protobuf
FeatureValue = Union[bytes, Sequence[bytes], int, Sequence[int]]
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # wire types


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values are encoded as their 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def _feature(value: FeatureValue) -> bytes:
    """A ``tf.train.Feature``: bytes_list (field 1) or int64_list (field 3, packed)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = [bytes(value)]
    elif isinstance(value, int):
        value = [value]
    values = list(value)
    if values and all(isinstance(v, (bytes, bytearray, memoryview)) for v in values):
        return _field(1, b"".join(_field(1, bytes(v)) for v in values))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return _field(3, _field(1, b"".join(_varint(int(v)) for v in values)))
    raise TypeError(f"feature values must be all bytes or all ints, got {values!r:.80}")


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serialize a ``tf.train.Example`` (``Features.feature`` map entries sorted by key: deterministic)."""
    entries = b"".join(
        _field(1, _field(1, k.encode("utf-8")) + _field(2, _feature(features[k]))) for k in sorted(features)
    )
    return _field(1, entries)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """``(value, next position)`` of the base-128 varint at ``pos``; :class:`BadImage` if malformed."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise BadImage("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise BadImage("protobuf varint too long")


def iter_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of a protobuf message: ints for varints and fixed-width
    fields, bytes for length-delimited ones."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = read_varint(buf, pos)
            if pos + size > n:
                raise BadImage("truncated protobuf field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _I64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == _I32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise BadImage(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def decode_example(payload: bytes) -> dict[str, list[Any]]:
    """The ``bytes_list`` and ``int64_list`` features of a serialized ``tf.train.Example``.

    ``Example{1: Features{1: map<string, Feature>}}``, ``Feature{1: BytesList, 2: FloatList,
    3: Int64List}``; packed and unpacked int64 lists are both read; float lists (bounding boxes in
    foreign ImageNet TFRecords) are skipped.  Raises :class:`BadImage` (a ``ValueError``) on
    malformed bytes.
    """
    out: dict[str, list[Any]] = {}
    for num, wire, features in iter_fields(payload):
        if num != 1 or wire != _LEN:
            continue
        for enum, ewire, entry in iter_fields(features):
            if enum != 1 or ewire != _LEN:
                continue
            key, feature = None, b""
            for knum, kwire, kval in iter_fields(entry):
                if knum == 1 and kwire == _LEN:
                    key = bytes(kval).decode("utf-8", "replace")
                elif knum == 2 and kwire == _LEN:
                    feature = kval
            if key is None:
                continue
            out[key] = []
            for fnum, fwire, lst in iter_fields(feature):
                if fwire != _LEN or fnum not in (1, 3):
                    continue
                values: list[Any] = []
                for vnum, vwire, v in iter_fields(lst):
                    if vnum != 1:
                        continue
                    if fnum == 1 and vwire == _LEN:
                        values.append(bytes(v))
                    elif fnum == 3 and vwire == _VARINT:
                        values.append(_signed64(v))
                    elif fnum == 3 and vwire == _LEN:  # packed
                        j = 0
                        while j < len(v):
                            x, j = read_varint(v, j)
                            values.append(_signed64(x))
                out[key] = values
    return out


def example_sample(features: Mapping[str, list[Any]]) -> tuple[bytes, int]:
    """``(image bytes, label)`` of a decoded example; :class:`BadImage` when either is missing."""
    image = features.get("image/encoded")
    label = features.get("image/class/label")
    if not isinstance(image, list) or not image or not isinstance(image[0], bytes):
        raise BadImage("record has no image/encoded bytes")
    if not isinstance(label, list) or not label or not isinstance(label[0], int):
        raise BadImage("record has no image/class/label int64")
    return image[0], int(label[0])


# ----------------------------------------------------------------------------- writer
class TFRecordShardWriter(ShardWriter):
    """``tf.train.Example`` records; the index has one ``offset size`` line per record (DALI tfrecord2idx)."""

    fmt = "tfrecord"

    def add(self, index: int, label: int, jpeg: bytes) -> None:
        example = encode_example(
            {"image/encoded": jpeg, "image/class/label": int(label), "image/index": int(index)}
        )
        record = tfrecord_frame(example)
        self._idx.write(format_index_line(self._data.size, len(record)).encode())
        self._data.write(record)
        self.num_samples += 1


# ----------------------------------------------------------------------------- reader
class TFRecordSource(ShardedSource):
    """Random access to the records of a prepared (or foreign) TFRecord split.

    Records are located through the ``tfrecord2idx`` index files; a missing index is rebuilt in memory
    by walking the record headers.  :meth:`read` checks the framing, not the CRCs (``inspect --deep``
    does).
    """

    format = "tfrecord"

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        shards, offsets, sizes, paths = [], [], [], []
        for k, sh in enumerate(manifest_shards(manifest, root)):
            path = os.path.join(root, sh["path"])
            idx = os.path.join(root, sh["index"]) if sh.get("index") else None
            table = read_tfrecord_index(idx) if idx and os.path.exists(idx) else scan_tfrecord(path, idx)
            check_count(path, len(table), sh.get("num_samples"))
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
        image, label = example_sample(decode_example(mm[off + 12:off + 12 + length]))
        return image, self._check_label(label)

    def name(self, i: int) -> str:
        shard = int(self._shard[i])
        first = int(np.searchsorted(self._shard, shard))
        return f"{self._paths[shard]}#{i - first}"
