"""The reference backend: PIL decode + torchvision functional transforms, as in the official SwAV code."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFile, ImageFilter, ImageOps
from torch.utils.data import Dataset

from pipelines.errors import DataError

from .badsamples import MAX_REPLACEMENTS, BadSamples
from .formats.probe import MAX_PIXELS, ORIENTATION_TAG
from .formats.sources import open_source
from .params import ViewParams, sample_params_for_indices
from .spec import MultiCropSpec

log = logging.getLogger("pipelines")

#: What this backend reads (:mod:`pipelines.formats`); the README's backend table lists it.
FORMATS = ("folder", "tfrecord", "wds")
__all__ = ["FORMATS", "MAX_PIXELS", "MAX_REPLACEMENTS", "PILMultiCropDataset", "Sample", "augment_view",
           "decode_rgb", "normalise"]
#: EXIF orientation tag: every loader applies it (``pipelines.exif``), as ``swav-fast prepare`` does.
EXIF_ORIENTATION = ORIENTATION_TAG
_JITTER_FNS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


@dataclass
class Sample:
    """One decoded and augmented sample (``index`` is the requested index, even when replaced)."""

    views: list[torch.Tensor]
    label: int
    index: int
    ok: bool
    bad_paths: list[str]
    params: list[ViewParams]


def decode_rgb(path: str | IO[bytes]) -> Image.Image:
    """Open ``path`` (a file name or a binary file object) as an RGB PIL image, turned per its EXIF
    orientation; raise on corrupt, truncated or oversized files."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False so truncated "
                    "files count as bad instead of decoding as gray")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{im.width}x{im.height} pixels exceeds the {MAX_PIXELS} pixel limit")
            im.load()
            if im.getexif().get(EXIF_ORIENTATION, 1) != 1:  # as displayed: the rule of every loader
                im = ImageOps.exif_transpose(im)
            return im if im.mode == "RGB" else im.convert("RGB")


def augment_view(img: Image.Image, p: ViewParams, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Apply one view's parameters to an RGB image: float32 CHW, normalised."""
    out = img.crop((p.left, p.top, p.left + p.width, p.top + p.height))
    out = out.resize((p.size, p.size), Image.Resampling.BILINEAR)
    if p.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if p.jitter:
        factors = (p.brightness, p.contrast, p.saturation, p.hue)
        for k in p.jitter_order:
            out = _JITTER_FNS[k](out, factors[k])
    if p.grayscale:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if p.blur_sigma > 0:
        out = out.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        out = ImageOps.solarize(out, threshold=128)
    return normalise(F.pil_to_tensor(out), mean, std)


def normalise(t: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (``[..., 3, H, W]``) to float32 ``(x / 255 - mean) / std`` (``mean``, ``std``: [3, 1, 1]),
    contiguous. ``pil_to_tensor`` gives an HWC buffer seen as CHW: made contiguous first, the three
    broadcast ops take half the CPU time at 96-224 px (the same bits: they are elementwise; about even
    at 64 px). Per view, not per stacked batch: a view's buffer stays in cache between the ops."""
    return t.contiguous().float().div_(255.0).sub_(mean).div_(std)


class PILMultiCropDataset(Dataset):
    """Map-style dataset giving ``(views, label, index, ok)`` (plus ``params`` when ``return_params``).

    ``source``: any dataset :func:`pipelines.formats.open_source` opens for this backend (an ImageFolder
    path or index, TFRecord or webdataset shards) or an opened source.  The augmentation of sample
    ``i`` is :func:`~pipelines.params.sample_params` ``(seed, epoch, i)`` (the contract every backend
    shares).  A sample that cannot be read or decoded goes through the ``bad_samples`` policy
    (:class:`~pipelines.badsamples.BadSamples`): logged once and replaced by the next decodable sample
    ``j`` (augmented with ``j``'s parameters), ``ok=False``; or, with ``skip``, left out (``views``
    empty).
    """

    def __init__(self, source: Any, spec: MultiCropSpec, seed: int = 0,
                 return_params: bool = False, bad_samples: str = "replace") -> None:
        self.source = open_source(source, formats=FORMATS)
        self.root = self.source.root
        self.classes = list(self.source.classes)
        self.bad = BadSamples(bad_samples)
        self.spec = spec
        self.seed = int(seed)
        self.epoch = 0
        self.return_params = return_params
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def path(self, i: int) -> str:
        """Where sample ``i`` is stored (a file path, or ``shard#key``)."""
        return self.source.name(i)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        s = self.load(i)
        if self.return_params:
            return s.views, s.label, s.index, s.ok, s.params
        return s.views, s.label, s.index, s.ok

    def _decode(self, j: int) -> tuple[Image.Image, int]:
        buf, label = self.source.read(j)
        return decode_rgb(io.BytesIO(buf)), int(label)

    def load(self, i: int, epoch: int | None = None) -> Sample:
        """Decode and augment sample ``i`` of ``epoch`` (default: the current epoch)."""
        return self.load_many([i], epoch)[0]

    def load_many(self, indices: list[int], epoch: int | None = None) -> list[Sample]:
        """Decode and augment every sample in ``indices`` of ``epoch`` (default: the current epoch),
        their augmentation parameters drawn in one vectorised call (the same as one sample at a time:
        per sample, the numpy overhead of the draw is a fifth of the work at 64 px)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self)
        decoded: list[tuple[int, int, Any, list[str]]] = []  # (requested i, decoded j, (img, label) | None, bad)
        for i in indices:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"sample index {i} out of range for {n} samples")
            j, got, bad = self.bad.resolve(i, n, self._decode, self.source.name)
            decoded.append((i, j, got, bad))
        rows = [k for k, d in enumerate(decoded) if d[2] is not None]
        drawn = sample_params_for_indices(
            self.spec, self.seed, epoch, [decoded[k][1] for k in rows],
            [decoded[k][2][0].width for k in rows], [decoded[k][2][0].height for k in rows]) if rows else []
        out: list[Sample] = []
        row = {k: r for r, k in enumerate(rows)}
        for k, (i, j, got, bad) in enumerate(decoded):
            if got is None:  # skipped
                out.append(Sample([], -1, i, False, bad, []))
                continue
            img, label = got
            params = [view.row(row[k]) for view in drawn]
            views = [augment_view(img, p, self._mean, self._std) for p in params]
            out.append(Sample(views, label, i, not bad, bad, params))
        return out
