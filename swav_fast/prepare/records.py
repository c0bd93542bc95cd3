"""Byte-level encoders for the shard formats: TFRecord framing, ``tf.train.Example`` protobuf, tar members.

No TensorFlow and no webdataset dependency: the formats are small enough to write by hand, and
writing them here keeps the output byte-for-byte deterministic.

TFRecord framing (one record)::

    uint64 length | uint32 masked_crc32c(length) | payload | uint32 masked_crc32c(payload)

with ``masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8  (mod 2^32)`` and CRC-32C (Castagnoli).
"""

from __future__ import annotations

import logging
import struct
import tarfile
from typing import Callable, Iterator, Mapping, Sequence, Union

log = logging.getLogger("swav_fast.prepare")

TAR_BLOCK = 512
#: tar archives are padded to a multiple of this (as GNU tar and Python's tarfile do).
TAR_RECORD = 20 * TAR_BLOCK
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


def tfrecord_frame(payload: bytes) -> bytes:
    """One TFRecord record around ``payload`` (length, its CRC, payload, payload CRC)."""
    n = struct.pack("<Q", len(payload))
    return b"".join(
        (n, struct.pack("<I", masked_crc32c(n)), payload, struct.pack("<I", masked_crc32c(payload)))
    )


def iter_tfrecord_offsets(fp, file_size: int, check_crc: bool = False) -> Iterator[tuple[int, int]]:
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


def read_tfrecord_payload(fp, offset: int, size: int, check_crc: bool = True) -> bytes:
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


# ----------------------------------------------------------------------------- tf.train.Example
FeatureValue = Union[bytes, Sequence[bytes], int, Sequence[int]]
_LEN = 2  # wire type: length-delimited
_VARINT = 0


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


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _iter_fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            yield number, wire, buf[pos:pos + n]
            pos += n
        elif wire == _VARINT:
            v, pos = _read_varint(buf, pos)
            yield number, wire, v
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def decode_example(payload: bytes) -> dict[str, list[bytes] | list[int]]:
    """Parse a serialized ``tf.train.Example`` into ``{key: [bytes, ...] or [int, ...]}`` (no float lists)."""
    out: dict[str, list[bytes] | list[int]] = {}
    for num, _, features in _iter_fields(payload):
        if num != 1:
            continue
        for fnum, _, entry in _iter_fields(features):  # type: ignore[arg-type]
            if fnum != 1:
                continue
            key, feat = "", b""
            for enum_, _, v in _iter_fields(entry):  # type: ignore[arg-type]
                if enum_ == 1:
                    key = bytes(v).decode("utf-8")  # type: ignore[arg-type]
                elif enum_ == 2:
                    feat = v  # type: ignore[assignment]
            for kind, _, lst in _iter_fields(feat):
                if kind == 1:
                    out[key] = [bytes(v) for n, _, v in _iter_fields(lst) if n == 1]  # type: ignore[arg-type]
                elif kind == 3:
                    ints: list[int] = []
                    for n, wire, v in _iter_fields(lst):  # type: ignore[arg-type]
                        if n != 1:
                            continue
                        if wire == _LEN:  # packed
                            p = 0
                            while p < len(v):  # type: ignore[arg-type]
                                x, p = _read_varint(v, p)  # type: ignore[arg-type]
                                ints.append(_signed64(x))
                        else:
                            ints.append(_signed64(v))  # type: ignore[arg-type]
                    out[key] = ints
                elif kind == 2:
                    raise ValueError(f"feature {key!r}: float_list is not supported here")
    return out


# ----------------------------------------------------------------------------- tar members
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
