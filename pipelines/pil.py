"""The reference backend: PIL decode + torchvision functional transforms, as in the official SwAV code."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFile, ImageFilter, ImageOps
from torch.utils.data import Dataset

from pipelines.errors import DataError

from .folder import ImageFolderIndex
from .params import ViewParams, sample_params
from .spec import MultiCropSpec

log = logging.getLogger("pipelines")

#: Larger images are treated as bad (PIL's own decompression-bomb warning limit, ~89M pixels).
MAX_PIXELS = 89_478_485
#: How many following samples are tried in turn when a file cannot be decoded.
MAX_REPLACEMENTS = 16
#: EXIF orientation tag: every loader applies it (``pipelines.exif``), as ``swav-fast prepare`` does.
EXIF_ORIENTATION = 0x0112
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


def decode_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image, turned per its EXIF orientation; raise on corrupt, truncated
    or oversized files."""
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
    t = F.pil_to_tensor(out).float().div_(255.0)
    return t.sub_(mean).div_(std)


class PILMultiCropDataset(Dataset):
    """Map-style dataset giving ``(views, label, index, ok)`` (plus ``params`` when ``return_params``).

    The augmentation of sample ``i`` is :func:`~pipelines.params.sample_params` ``(seed, epoch, i)``
    (the contract every backend shares).  A file that cannot be decoded is logged once and replaced by
    the next decodable sample ``j`` (augmented with ``j``'s parameters), ``ok=False``.
    """

    def __init__(self, index: ImageFolderIndex, spec: MultiCropSpec, seed: int = 0,
                 return_params: bool = False) -> None:
        self.root = index.root
        self.classes = list(index.classes)
        # numpy arrays, not Python lists: forked workers then do not copy them page by page.
        self._paths = np.array([p.encode("utf-8") for p, _ in index.samples])
        self._labels = np.array([c for _, c in index.samples], dtype=np.int64)
        self.spec = spec
        self.seed = int(seed)
        self.epoch = 0
        self.return_params = return_params
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._paths[i].decode("utf-8"))

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        s = self.load(i)
        if self.return_params:
            return s.views, s.label, s.index, s.ok, s.params
        return s.views, s.label, s.index, s.ok

    def load(self, i: int, epoch: int | None = None) -> Sample:
        """Decode and augment sample ``i`` of ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self)
        i = int(i)
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        bad: list[str] = []
        for k in range(min(MAX_REPLACEMENTS, n)):
            j = (i + k) % n
            path = self.path(j)
            try:
                img = decode_rgb(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
                self._warn_bad(path, e)
                bad.append(path)
                continue
            params = sample_params(self.spec, self.seed, epoch, j, img.width, img.height)
            views = [augment_view(img, p, self._mean, self._std) for p in params]
            return Sample(views, int(self._labels[j]), i, not bad, bad, params)
        raise DataError(f"{len(bad)} consecutive unreadable images starting at {bad[0]}; is the dataset corrupt?")

    def _warn_bad(self, path: str, err: BaseException) -> None:
        if path not in self._warned:
            self._warned.add(path)
            log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
