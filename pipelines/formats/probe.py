"""The one encoded-image header probe: size and cheap integrity checks, before any decoder sees a file.

Every reader (the loaders' bad-file checks, ``swav-fast prepare`` and ``inspect``) asks
:func:`image_size`, and the loaders read the EXIF orientation with :func:`jpeg_orientation` (the
same marker walk, :func:`jpeg_segments`); a file that fails raises :class:`BadImage` with the reason.  No torch, no
decoding: it reads markers and chunk headers only (PIL's header parser for the rarer formats).
"""

from __future__ import annotations

import io
from typing import Iterator

from pipelines.errors import DataError

#: Larger images are treated as bad (PIL's own decompression-bomb warning limit, ~89M pixels).
MAX_PIXELS = 89_478_485
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: EXIF tag 0x0112.
ORIENTATION_TAG = 0x0112
#: JPEG start-of-frame markers (they carry the image size): C0-CF except DHT (C4), JPG (C8), DAC (CC).
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class BadImage(DataError, ValueError):
    """An encoded image (or a record holding one) that cannot become a sample; ``str(exc)`` is the reason.

    A :class:`~pipelines.errors.DataError` (one clear line) and a ``ValueError`` (what the format
    parsers raise for malformed bytes)."""


def is_jpeg(buf: bytes | bytearray | memoryview) -> bool:
    """True when ``buf`` starts with a JPEG start-of-image marker followed by a marker."""
    return bytes(buf[:3]) == b"\xff\xd8\xff"


def check_size(w: int, h: int) -> tuple[int, int]:
    """``(w, h)`` when ``1 <= w, h`` and ``w h <= MAX_PIXELS``; :class:`BadImage` otherwise."""
    if w <= 0 or h <= 0:
        raise BadImage(f"invalid image size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise BadImage(f"{w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit")
    return w, h


def jpeg_segments(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int]]:
    """``(marker, position, segment length)`` of a JPEG's marker segments from SOI up to and including
    the start of scan (SOS); the one marker walk of the project.  Raises :class:`BadImage` when the
    bytes are not a JPEG or a header is corrupt."""
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise BadImage("not a JPEG (no start-of-image marker)")
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            raise BadImage(f"corrupt JPEG header (no marker at byte {pos})")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2:
            raise BadImage(f"corrupt JPEG header (segment length {length} at byte {pos})")
        yield marker, pos, length
        if marker == 0xDA:
            return
        pos += 2 + length


def jpeg_size(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(width, height)`` of a baseline / progressive JPEG; :class:`BadImage` when it cannot decode.

    Walks the marker segments (:func:`jpeg_segments`) to the start of scan (SOS): a start-of-frame
    segment must come before it, and an end-of-image marker ``FF D9`` must follow it (entropy-coded
    data cannot contain ``FF D9``, so a truncated file has none; searching from the scan skips an EXIF
    thumbnail's).
    """
    size: tuple[int, int] | None = None
    for marker, pos, _ in jpeg_segments(buf):
        if marker in JPEG_SOF and size is None and pos + 9 <= len(buf):
            size = ((buf[pos + 7] << 8) | buf[pos + 8], (buf[pos + 5] << 8) | buf[pos + 6])
        if marker == 0xDA:  # start of scan: the frame header must have come
            if size is None:
                raise BadImage("JPEG scan before any frame header")
            check_size(*size)
            find = buf.rfind if hasattr(buf, "rfind") else bytes(buf).rfind
            if find(b"\xff\xd9", pos) < 0:
                raise BadImage("truncated JPEG (no end-of-image marker)")
            return size
    raise BadImage("truncated JPEG (ends before its scan data)" if size is not None
                   else "JPEG without a frame header")


def jpeg_orientation(buf: bytes | bytearray | memoryview) -> int:
    """The EXIF orientation (1..8) of a JPEG, from its APP1 segment without decoding; 1 when it has
    none or it cannot be read."""
    data = bytes(buf[:1 << 16]) if len(buf) > 1 << 16 else bytes(buf)
    try:
        for marker, pos, length in jpeg_segments(data):
            if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
                return _tiff_orientation(data[pos + 10:pos + 2 + length])
    except BadImage:
        pass
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for k in range(count):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            break
        if int.from_bytes(tiff[e:e + 2], order) == ORIENTATION_TAG:
            value = int.from_bytes(tiff[e + 8:e + 10], order)  # SHORT, left-justified in the value field
            return value if 1 <= value <= 8 else 1
    return 1


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """``(width, height)`` once ``orientation`` is applied (5..8 swap the axes)."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_size(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(width, height)`` from the header of an encoded image, after cheap integrity checks.

    JPEG: :func:`jpeg_size`.  PNG: the IHDR chunk and a final IEND chunk.  Other formats: PIL's
    header parser.  Raises :class:`BadImage` (empty, truncated, corrupt, over :data:`MAX_PIXELS`).
    """
    n = len(buf)
    if n == 0:
        raise BadImage("empty file")
    if bytes(buf[:2]) == b"\xff\xd8":
        return jpeg_size(buf)
    if bytes(buf[:8]) == _PNG_SIGNATURE:
        if n < 33 or bytes(buf[12:16]) != b"IHDR":
            raise BadImage("PNG without an IHDR chunk")
        if bytes(buf[max(0, n - 16):]).rfind(b"IEND") < 0:
            raise BadImage("truncated PNG (no IEND chunk)")
        w, h = int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    else:
        w, h = _other_size(buf)
    return check_size(w, h)


def _other_size(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(buf))) as im:
            return int(im.width), int(im.height)
    except UnidentifiedImageError:
        raise BadImage("not a readable image (unrecognised format)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
        raise BadImage(f"not a readable image ({type(e).__name__}: {e})") from e
