"""EXIF orientation, one rule for every loader: images are used as displayed (as
``PIL.ImageOps.exif_transpose`` shows them, and as ``swav-fast prepare`` stores them).

:func:`jpeg_orientation` (:mod:`pipelines.formats.probe`) reads the tag from a JPEG's APP1 segment
without decoding;
:func:`orient_chw` turns a decoded ``[C, H, W]`` tensor (any device) the same way PIL does.
"""
from __future__ import annotations

import torch

from .formats.probe import ORIENTATION_TAG, jpeg_orientation, oriented_size

__all__ = ["ORIENTATION_TAG", "jpeg_orientation", "orient_chw", "oriented_size"]


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
