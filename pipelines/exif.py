"""EXIF orientation, one rule for every loader: images are used as displayed (as
``PIL.ImageOps.exif_transpose`` shows them, and as ``swav-fast prepare`` stores them).

:func:`jpeg_orientation` reads the tag from a JPEG's APP1 segment without decoding;
:func:`orient_chw` turns a decoded ``[C, H, W]`` tensor (any device) the same way PIL does.
"""
from __future__ import annotations

import torch

#: EXIF tag 0x0112.
ORIENTATION_TAG = 0x0112


def jpeg_orientation(buf: bytes | bytearray | memoryview) -> int:
    """The EXIF orientation (1..8) of a JPEG; 1 when it has none or it cannot be read."""
    data = bytes(buf[:1 << 16]) if len(buf) > 1 << 16 else bytes(buf)
    n, i = len(data), 2
    if data[:2] != b"\xff\xd8":
        return 1
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # scan data: no more metadata segments
            return 1
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
            return _tiff_orientation(data[i + 10:i + 2 + length])
        i += 2 + length
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


def orient_chw(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``img`` ``[C, H, W]`` turned as ``PIL.ImageOps.exif_transpose`` turns it for ``orientation``."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:  # transpose
        return img.transpose(-1, -2).contiguous()
    if orientation == 6:  # 90 degrees clockwise
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # 90 degrees counter-clockwise
        return img.transpose(-1, -2).flip(-2)
    return img
