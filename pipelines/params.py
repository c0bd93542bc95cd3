"""Backend-independent random augmentation parameters.

Every view consumes one fixed block of ``NUM_UNIFORMS`` uniforms from the sample's generator, so
the parameters of a sample depend only on ``(seed, epoch, index)`` and the image size: the PIL
backend and a GPU backend that call :func:`sample_params_for_indices` draw identical crops, flips,
jitter factors, etc.  The mapping from uniforms to parameters follows torchvision
(RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale) and SwAV's
PIL Gaussian blur.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .spec import MultiCropSpec

CROP_ATTEMPTS = 10
# Layout of the per-view uniform block.
_U_SCALE = slice(0, CROP_ATTEMPTS)
_U_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = 20, 21, 22, 23
_U_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
_U_ORDER, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 28, 29, 30, 31, 32
NUM_UNIFORMS = 33

#: All 24 orders of (brightness=0, contrast=1, saturation=2, hue=3), as torch.randperm(4) could give.
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)
IDENTITY_ORDER = (0, 1, 2, 3)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in ``epoch``: independent of worker count and order."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


@dataclass(frozen=True)
class ViewParams:
    """Parameters of one view.  Crop box is in source pixels; jitter fields are neutral when ``jitter`` is False."""

    size: int
    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_order: tuple[int, int, int, int]
    grayscale: bool
    blur_sigma: float  # 0.0 when no blur
    solarize: bool


@dataclass(frozen=True)
class BatchViewParams:
    """Parameters of one view for ``B`` samples, as numpy arrays of length ``B`` (``jitter_order``: [B, 4])."""

    size: int
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    jitter_order: np.ndarray
    grayscale: np.ndarray
    blur_sigma: np.ndarray
    solarize: np.ndarray

    def __len__(self) -> int:
        return len(self.top)

    def row(self, i: int) -> ViewParams:
        """The parameters of sample ``i`` as a :class:`ViewParams`."""
        return ViewParams(
            size=self.size, top=int(self.top[i]), left=int(self.left[i]), height=int(self.height[i]),
            width=int(self.width[i]), flip=bool(self.flip[i]), jitter=bool(self.jitter[i]),
            brightness=float(self.brightness[i]), contrast=float(self.contrast[i]),
            saturation=float(self.saturation[i]), hue=float(self.hue[i]),
            jitter_order=tuple(int(k) for k in self.jitter_order[i]),  # type: ignore[arg-type]
            grayscale=bool(self.grayscale[i]), blur_sigma=float(self.blur_sigma[i]), solarize=bool(self.solarize[i]))


def params_from_uniforms(spec: MultiCropSpec, view_index: int, widths: np.ndarray, heights: np.ndarray,
                         u: np.ndarray) -> BatchViewParams:
    """Map uniforms ``u`` [B, NUM_UNIFORMS] in [0, 1) to the parameters of view ``view_index``."""
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    u = np.asarray(u, dtype=np.float64).reshape(len(widths), NUM_UNIFORMS)
    top, left, h, w = _crop_boxes(spec, view_index, widths, heights, u)

    flip = u[:, _U_FLIP] < spec.flip_p
    jitter = u[:, _U_JITTER] < spec.jitter_p
    b, c, s, hue_max = spec.jitter_factors
    uf = u[:, _U_FACTORS]
    factors = [np.maximum(0.0, 1.0 - m) + uf[:, k] * (1.0 + m - np.maximum(0.0, 1.0 - m))
               for k, m in enumerate((b, c, s))]
    hue = -hue_max + uf[:, 3] * 2.0 * hue_max
    order = JITTER_ORDERS[np.minimum((u[:, _U_ORDER] * 24).astype(np.int64), 23)]
    ones = np.ones(len(u))
    lo, hi = spec.blur_sigma
    blur = u[:, _U_BLUR] < spec.blur_p
    return BatchViewParams(
        size=spec.view_sizes[view_index], top=top, left=left, height=h, width=w, flip=flip, jitter=jitter,
        brightness=np.where(jitter, factors[0], ones), contrast=np.where(jitter, factors[1], ones),
        saturation=np.where(jitter, factors[2], ones), hue=np.where(jitter, hue, 0.0),
        jitter_order=np.where(jitter[:, None], order, np.array(IDENTITY_ORDER)),
        grayscale=u[:, _U_GRAY] < spec.grayscale_p,
        blur_sigma=np.where(blur, lo + u[:, _U_SIGMA] * (hi - lo), 0.0),
        solarize=u[:, _U_SOLARIZE] < spec.solarize_p)


def _crop_boxes(spec: MultiCropSpec, view_index: int, widths: np.ndarray, heights: np.ndarray,
                u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision RandomResizedCrop.get_params, vectorised: (top, left, height, width)."""
    smin, smax = spec.scale_range(view_index)
    rmin, rmax = spec.ratio
    area = (widths * heights).astype(np.float64)[:, None]
    target = area * (smin + u[:, _U_SCALE] * (smax - smin))
    log_lo, log_hi = np.log(rmin), np.log(rmax)
    aspect = np.exp(log_lo + u[:, _U_RATIO] * (log_hi - log_lo))
    w_try = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h_try = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w_try > 0) & (w_try <= widths[:, None]) & (h_try > 0) & (h_try <= heights[:, None])
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(u))
    found = ok[rows, first]

    # Fallback: central crop at the nearest allowed aspect ratio.
    in_ratio = widths / heights
    fb_w = np.where(in_ratio < rmin, widths, np.where(in_ratio > rmax, np.round(heights * rmax), widths))
    fb_h = np.where(in_ratio < rmin, np.round(widths / rmin), heights)
    fb_w, fb_h = fb_w.astype(np.int64), fb_h.astype(np.int64)

    w = np.where(found, w_try[rows, first], fb_w)
    h = np.where(found, h_try[rows, first], fb_h)
    top_rand = np.minimum((u[:, _U_TOP] * (heights - h + 1)).astype(np.int64), heights - h)
    left_rand = np.minimum((u[:, _U_LEFT] * (widths - w + 1)).astype(np.int64), widths - w)
    top = np.where(found, top_rand, (heights - h) // 2)
    left = np.where(found, left_rand, (widths - w) // 2)
    return top, left, h, w


def sample_view_params(spec: MultiCropSpec, view_index: int, width: int, height: int,
                       rng: np.random.Generator) -> ViewParams:
    """Draw the parameters of one view (consumes ``NUM_UNIFORMS`` uniforms from ``rng``)."""
    u = rng.random(NUM_UNIFORMS)[None]
    return params_from_uniforms(spec, view_index, np.array([width]), np.array([height]), u).row(0)


def sample_all_view_params(spec: MultiCropSpec, width: int, height: int,
                           rng: np.random.Generator) -> list[ViewParams]:
    """Parameters of every view of one sample, in view order (same draws as repeated sample_view_params)."""
    return [sample_view_params(spec, v, width, height, rng) for v in range(spec.num_views)]


def sample_batch_params(spec: MultiCropSpec, view_index: int, widths: Sequence[int], heights: Sequence[int],
                        rng: np.random.Generator) -> BatchViewParams:
    """Vectorised draw for many samples from one generator (same distribution, not per-sample streams)."""
    widths_a = np.asarray(widths, dtype=np.int64)
    u = rng.random((len(widths_a), NUM_UNIFORMS))
    return params_from_uniforms(spec, view_index, widths_a, np.asarray(heights, dtype=np.int64), u)


def sample_params_for_indices(spec: MultiCropSpec, seed: int, epoch: int, indices: Sequence[int],
                              widths: Sequence[int], heights: Sequence[int]) -> list[BatchViewParams]:
    """Per-view batch parameters using each sample's own stream: identical to the PIL backend's draws."""
    u = np.stack([sample_rng(seed, epoch, i).random((spec.num_views, NUM_UNIFORMS)) for i in indices]) \
        if len(indices) else np.zeros((0, spec.num_views, NUM_UNIFORMS))
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    return [params_from_uniforms(spec, v, w, h, u[:, v]) for v in range(spec.num_views)]
