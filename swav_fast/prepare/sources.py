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
from dataclasses import dataclass, field, replace
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.folder import scan_image_folder
from pipelines.formats.probe import MAX_PIXELS, ORIENTATION_TAG, BadImage  # noqa: F401 - BadImage: the one class

#: Quality used to re-encode a file that cannot be passed through when no quality is given.
DEFAULT_QUALITY = 90
_EXIF_ORIENTATION = ORIENTATION_TAG


#: Where a worker reads one source image: an absolute file path, or ``(archive, offset, size)``.
ItemSpec = Union[str, tuple[str, int, int]]


@dataclass(frozen=True)
class SourceList:
    """The sorted source: ``paths[i]`` (relative to ``root``) has label ``labels[i]``; ``i`` is its index.

    ``paths`` are the ImageFolder paths (``<class>/<file>``) that an extracted copy of the source
    would have; the bytes are read from ``root/paths[i]`` (an ImageFolder), ``root/files[i]`` (a flat
    folder) or ``tar`` at ``offsets[i]`` (``sizes[i]`` bytes; an archive).  ``bad`` lists source
    problems found while scanning (a corrupt inner tar); ``info`` is provenance for the manifest.
    """

    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    kind: str = "imagefolder"
    files: list[str] | None = None
    tar: str | None = None
    offsets: Any = None
    sizes: Any = None
    bad: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, i: int) -> ItemSpec:
        """Where sample ``i``'s bytes are (what :func:`encode_chunk` is given)."""
        if self.tar is not None:
            return (self.tar, int(self.offsets[i]), int(self.sizes[i]))
        return os.path.join(self.root, (self.files or self.paths)[i])

    def subset(self, keep: Sequence[int], classes: list[str], labels: Sequence[int]) -> "SourceList":
        """The samples ``keep`` (in that order) relabelled ``labels`` over ``classes``."""
        pick = list(keep)
        return replace(
            self,
            classes=list(classes),
            paths=[self.paths[i] for i in pick],
            labels=[int(v) for v in labels],
            files=None if self.files is None else [self.files[i] for i in pick],
            offsets=None if self.offsets is None else np.asarray(self.offsets)[pick],
            sizes=None if self.sizes is None else np.asarray(self.sizes)[pick],
        )

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
    #: why a file that could not pass through was converted (CMYK, grayscale, PNG data...); "" otherwise
    note: str = ""


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
    return _encode(data, max_resolution, quality)[:4]  # type: ignore[return-value]


def _encode(
    data: bytes, max_resolution: int | None, quality: int | None
) -> tuple[bytes, int, int, bool, str]:
    """:func:`encode_image` plus the conversion note (see :func:`conversion_note`)."""
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
            return data, w, h, True, ""
        note = conversion_note(fmt, im.mode, _orientation(im)) if quality is None else ""
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
        return buf.getvalue(), rgb.width, rgb.height, False, note


def conversion_note(fmt: str | None, mode: str, orientation: int | None) -> str:
    """Why a decodable file is not a plain RGB JPEG ("" when it is one: resizing alone is no oddity)."""
    if fmt != "JPEG":
        return f"{fmt or 'unknown'} data converted to JPEG"
    if mode != "RGB":
        return f"{mode} JPEG converted to RGB"
    if orientation not in (None, 1):
        return "EXIF-rotated JPEG re-encoded as stored"
    return ""


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - unreadable EXIF: treat as "needs re-encoding"
        return -1


def read_item(spec: ItemSpec, handles: dict[str, Any] | None = None) -> bytes:
    """The bytes of one source image: a whole file, or ``size`` bytes at ``offset`` of an archive.

    ``handles`` caches open archives between calls (the caller closes them).  Raises ``OSError``.
    """
    if isinstance(spec, str):
        with open(spec, "rb") as f:
            return f.read()
    path, offset, size = spec
    f = None if handles is None else handles.get(path)
    if f is None:
        f = open(path, "rb")
        if handles is not None:
            handles[path] = f
    try:
        f.seek(offset)
        data = f.read(size)
    finally:
        if handles is None:
            f.close()
    if len(data) != size:
        raise OSError(0, f"archive ends {size - len(data)} bytes early (truncated)")
    return data


def load_and_encode(
    index: int,
    path: ItemSpec,
    max_resolution: int | None,
    quality: int | None,
    handles: dict[str, Any] | None = None,
) -> EncodedImage:
    """Read ``path`` (see :func:`read_item`) and encode it; never raises for a bad file (the reason is
    in the result)."""
    try:
        data = read_item(path, handles)
    except OSError as exc:
        return EncodedImage(index, None, reason=f"unreadable ({exc.strerror or type(exc).__name__})")
    try:
        jpeg, w, h, passed, note = _encode(data, max_resolution, quality)
    except BadImage as exc:
        return EncodedImage(index, None, reason=str(exc))
    except MemoryError:
        return EncodedImage(index, None, reason="out of memory while decoding")
    return EncodedImage(index, jpeg, w, h, passed, note=note)


def encode_chunk(task: tuple[Sequence[tuple[int, ItemSpec]], int | None, int | None]) -> list[EncodedImage]:
    """Pool entry point (module level, picklable): encode ``[(index, item spec), ...]`` in order."""
    items, max_resolution, quality = task
    handles: dict[str, Any] = {}
    try:
        return [load_and_encode(i, p, max_resolution, quality, handles) for i, p in items]
    finally:
        for f in handles.values():
            f.close()
