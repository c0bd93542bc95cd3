"""Reading source images: the sorted ImageFolder list, and each file turned into RGB JPEG bytes (or a reason).

A file is passed through unchanged (its original bytes) when no quality is forced and it is a valid
RGB JPEG (baseline or progressive) without an EXIF rotation, no larger than ``max_resolution``.
Anything else that decodes (CMYK or grayscale JPEG, PNG, a PNG named ``.jpg``, a rotated JPEG, a
larger image) is converted to RGB, resized so that its long side is ``max_resolution`` (aspect
kept) and re-encoded.  Every accepted file is decoded completely, so truncated data is caught here
and not in the training loop.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.folder import scan_image_folder
from pipelines.pil import MAX_PIXELS

#: Quality used to re-encode a file that cannot be passed through when no quality is given.
DEFAULT_QUALITY = 90
_EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """A source file that cannot become a sample; ``str(exc)`` is the reason listed in the report."""


@dataclass(frozen=True)
class SourceList:
    """The sorted source: ``paths[i]`` (relative to ``root``) has label ``labels[i]``; ``i`` is its index."""

    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """SHA-256 over classes and (path, label): identifies the plan that resumable runs must share."""
        h = hashlib.sha256()
        for c in self.classes:
            h.update(b"C" + c.encode("utf-8") + b"\0")
        for p, lab in zip(self.paths, self.labels):
            h.update(p.encode("utf-8") + b"\0" + str(lab).encode() + b"\n")
        return h.hexdigest()


def scan_source(src: str | os.PathLike[str]) -> SourceList:
    """The ImageFolder ``src`` (``src/<class>/**/<image>``), sorted by class then path.

    Raises :class:`~swav_fast.errors.DataError` if the folder is missing or holds no images.
    """
    index = scan_image_folder(src)
    return SourceList(
        root=index.root,
        classes=list(index.classes),
        paths=[p for p, _ in index.samples],
        labels=[c for _, c in index.samples],
    )


@dataclass(frozen=True)
class EncodedImage:
    """Result for one source file: JPEG bytes and size, or ``data is None`` and a ``reason``."""

    index: int
    data: bytes | None
    width: int = 0
    height: int = 0
    passthrough: bool = False
    reason: str = ""


def target_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int] | None:
    """Size with the long side scaled down to ``max_resolution`` (aspect kept); None if no resize is needed.

    ``scale = max_resolution / max(w, h)``; each side ``max(1, round(side * scale))``.
    """
    if max_resolution is None or max(width, height) <= max_resolution:
        return None
    scale = max_resolution / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of any decoded mode (16-bit and float images are scaled to 8 bits)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite on white so transparent regions do not turn into arbitrary colours
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def encode_image(
    data: bytes, max_resolution: int | None = None, quality: int | None = None
) -> tuple[bytes, int, int, bool]:
    """``(jpeg bytes, width, height, passed_through)`` for file contents ``data``; raise :class:`BadImage`.

    ``quality=None``: pass valid RGB JPEGs through, re-encode the rest at :data:`DEFAULT_QUALITY`.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, not decode as gray
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImage("not an image (unrecognised format)") from None
        except Image.DecompressionBombError as exc:
            raise BadImage(f"too large: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure makes the file bad
            raise BadImage(f"corrupt image header ({type(exc).__name__}: {exc})") from None
        w, h = im.size
        if w < 1 or h < 1:
            raise BadImage(f"invalid image size {w}x{h}")
        if w * h > MAX_PIXELS:
            raise BadImage(f"too large: {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit")
        fmt = im.format
        size = target_size(w, h, max_resolution)
        passthrough = (
            quality is None
            and fmt == "JPEG"
            and im.mode == "RGB"
            and size is None
            and _orientation(im) in (None, 1)
        )
        try:
            if size is not None and fmt == "JPEG":
                im.draft(im.mode, size)  # DCT-domain downscale (to >= size): faster decode, same result size
            im.load()
        except Exception as exc:  # noqa: BLE001
            raise BadImage(f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from None
        if passthrough:
            return data, w, h, True
        try:
            orientation = _orientation(im)
            if orientation not in (None, 1, -1):  # stored as displayed: the rule of every loader
                im = ImageOps.exif_transpose(im)
                if size is not None and orientation in (5, 6, 7, 8):
                    size = (size[1], size[0])
            rgb = _to_rgb(im)
            if size is not None and rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=int(quality or DEFAULT_QUALITY))
        except Exception as exc:  # noqa: BLE001
            raise BadImage(f"cannot convert to RGB JPEG ({type(exc).__name__}: {exc})") from None
        return buf.getvalue(), rgb.width, rgb.height, False


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - unreadable EXIF: treat as "needs re-encoding"
        return -1


def load_and_encode(index: int, path: str, max_resolution: int | None, quality: int | None) -> EncodedImage:
    """Read ``path`` and encode it; never raises for a bad file (the reason goes into the result)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return EncodedImage(index, None, reason=f"unreadable ({exc.strerror or type(exc).__name__})")
    try:
        jpeg, w, h, passed = encode_image(data, max_resolution, quality)
    except BadImage as exc:
        return EncodedImage(index, None, reason=str(exc))
    except MemoryError:
        return EncodedImage(index, None, reason="out of memory while decoding")
    return EncodedImage(index, jpeg, w, h, passed)


def encode_chunk(task: tuple[Sequence[tuple[int, str]], int | None, int | None]) -> list[EncodedImage]:
    """Pool entry point (module level, picklable): encode ``[(index, absolute path), ...]`` in order."""
    items, max_resolution, quality = task
    return [load_and_encode(i, p, max_resolution, quality) for i, p in items]
