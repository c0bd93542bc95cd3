"""The one randomness contract: every augmentation parameter is a pure function of
``(seed, epoch, sample index, view)`` (and the image size), drawn the same way by every backend.

The uniforms come from a counter-based generator, not a stateful stream: uniform ``k`` ("slot") of
view ``v`` of sample ``i`` in ``epoch`` is

    h = mix(mix(mix(mix(mix(TAG ^ seed) ^ epoch) ^ i) ^ v) ^ k),     u = (h >> 11) * 2**-53

with ``mix`` the splitmix64 finaliser (``z = x + 0x9E3779B97F4A7C15``;
``z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9``; ``z = (z ^ z >> 27) * 0x94D049BB133111EB``;
``z ^ z >> 31``, all mod 2**64), so ``u`` is uniform on the 2**53 multiples of 2**-53 in [0, 1).
The sample index is that of the sample actually decoded (a replacement for an unreadable file draws
its own parameters).  Nothing depends on batch composition, worker count, rank, world size or the
order of draws: the PIL backend (per sample), the torch and DALI backends (vectorised per batch) and
FFCV (a crop table per epoch) get identical parameters, and a resumed epoch draws exactly what the
uninterrupted one did.

Every view uses one block of ``NUM_UNIFORMS`` slots; :func:`params_from_uniforms` maps them to the
parameters following torchvision (RandomResizedCrop with its 10 attempts and central fallback,
RandomHorizontalFlip, RandomApply(ColorJitter) with a random order, RandomGrayscale) and SwAV's PIL
Gaussian blur.  The parameters of a view depend only on its own slots.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
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
#: The crop box uses slots 0..21 only (scale and ratio attempts, top, left).
CROP_SLOTS = _U_LEFT + 1

#: All 24 orders of (brightness=0, contrast=1, saturation=2, hue=3), as torch.randperm(4) could give.
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)
IDENTITY_ORDER = (0, 1, 2, 3)

# -- the counter-based generator -------------------------------------------------------------------
MASK64 = (1 << 64) - 1
#: Domain tag of the augmentation uniforms (no other stream of the project starts from it).
AUG_TAG = 0x5357_4156_4155_4731
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of ``x + 0x9E3779B97F4A7C15`` (uint64 arrays, arithmetic mod 2**64)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        return z ^ (z >> _S31)


def _u64(value: int) -> np.ndarray:
    return np.asarray(int(value) & MASK64, dtype=np.uint64)


def _indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError(f"sample indices must be >= 0, got {int(idx.min())}")
    return idx.astype(np.uint64)


def _sample_keys(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """``mix(mix(mix(TAG ^ seed) ^ epoch) ^ i)`` per index, uint64 [N]."""
    k = mix64(mix64(_u64(AUG_TAG) ^ _u64(seed)) ^ _u64(epoch))
    return mix64(k ^ _indices(indices))


def _to_unit(h: np.ndarray) -> np.ndarray:
    """The top 53 bits of ``h`` as a float64 in [0, 1)."""
    return (h >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def view_uniforms(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, view: int,
                  slots: int = NUM_UNIFORMS) -> np.ndarray:
    """``[N, slots]`` float64 uniforms in [0, 1) of view ``view`` of samples ``indices`` (pure function)."""
    kv = mix64(_sample_keys(seed, epoch, indices) ^ _u64(view))
    return _to_unit(mix64(kv[:, None] ^ np.arange(slots, dtype=np.uint64)[None, :]))


def sample_uniforms(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, num_views: int,
                    slots: int = NUM_UNIFORMS) -> np.ndarray:
    """``[V, N, slots]``: :func:`view_uniforms` of every view ``0..V-1`` at once."""
    ks = _sample_keys(seed, epoch, indices)
    kv = mix64(ks[None, :] ^ np.arange(num_views, dtype=np.uint64)[:, None])
    return _to_unit(mix64(kv[:, :, None] ^ np.arange(slots, dtype=np.uint64)[None, None, :]))


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


def sample_params_for_indices(spec: MultiCropSpec, seed: int, epoch: int, indices: Sequence[int] | np.ndarray,
                              widths: Sequence[int] | np.ndarray, heights: Sequence[int] | np.ndarray
                              ) -> list[BatchViewParams]:
    """Per view, the parameters of samples ``indices`` (images ``widths`` x ``heights``) in ``epoch``.

    The contract of every backend: row ``j`` of view ``v`` depends only on ``(seed, epoch, indices[j], v)``
    and that image's size.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    u = sample_uniforms(seed, epoch, idx, spec.num_views)
    w = np.asarray(widths, dtype=np.int64).reshape(-1)
    h = np.asarray(heights, dtype=np.int64).reshape(-1)
    if len(w) != len(idx) or len(h) != len(idx):
        raise ValueError(f"{len(idx)} indices but {len(w)} widths and {len(h)} heights")
    return [params_from_uniforms(spec, v, w, h, u[v]) for v in range(spec.num_views)]


def crop_boxes_for_indices(spec: MultiCropSpec, seed: int, epoch: int, indices: Sequence[int] | np.ndarray,
                           widths: Sequence[int] | np.ndarray, heights: Sequence[int] | np.ndarray,
                           chunk: int = 4096) -> np.ndarray:
    """``[V, N, 4]`` int64 ``(top, left, height, width)``: the crop boxes of
    :func:`sample_params_for_indices`, drawing only the crop slots, ``chunk`` samples at a time (a
    whole epoch's table at a few microseconds per sample)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    w = np.asarray(widths, dtype=np.int64).reshape(-1)
    h = np.asarray(heights, dtype=np.int64).reshape(-1)
    if len(w) != len(idx) or len(h) != len(idx):
        raise ValueError(f"{len(idx)} indices but {len(w)} widths and {len(h)} heights")
    out = np.empty((spec.num_views, len(idx), 4), dtype=np.int64)
    for start in range(0, len(idx), chunk):
        sl = slice(start, start + chunk)
        u = sample_uniforms(seed, epoch, idx[sl], spec.num_views, slots=CROP_SLOTS)
        for v in range(spec.num_views):
            out[v, sl] = np.stack(_crop_boxes(spec, v, w[sl], h[sl], u[v]), axis=1)
    return out


def sample_params(spec: MultiCropSpec, seed: int, epoch: int, index: int, width: int, height: int
                  ) -> list[ViewParams]:
    """The parameters of every view of one sample (row 0 of :func:`sample_params_for_indices`)."""
    return [p.row(0) for p in sample_params_for_indices(spec, seed, epoch, [index], [width], [height])]


def concat_params(params: Sequence[BatchViewParams]) -> BatchViewParams:
    """Stack per-view parameters of one crop size along the batch axis (view-major)."""
    if len(params) == 1:
        return params[0]
    arrays = {f.name: np.concatenate([getattr(p, f.name) for p in params])
              for f in fields(BatchViewParams) if f.name != "size"}
    return replace(params[0], **arrays)


def split_params(p: BatchViewParams, count: int) -> list[BatchViewParams]:
    """Inverse of :func:`concat_params` for ``count`` equal parts."""
    n = len(p) // count
    return [replace(p, **{f.name: getattr(p, f.name)[k * n:(k + 1) * n]
                          for f in fields(BatchViewParams) if f.name != "size"}) for k in range(count)]


def stack_rows(rows: Sequence[ViewParams]) -> BatchViewParams:
    """One view's :class:`ViewParams` of several samples as a :class:`BatchViewParams`."""
    if not rows:
        raise ValueError("stack_rows needs at least one row")
    arrays = {f.name: np.array([getattr(r, f.name) for r in rows])
              for f in fields(BatchViewParams) if f.name != "size"}
    arrays["jitter_order"] = arrays["jitter_order"].reshape(len(rows), 4).astype(np.int64)
    return BatchViewParams(size=rows[0].size, **arrays)


def params_equal(a: BatchViewParams, b: BatchViewParams) -> bool:
    """Same size and every field equal (exactly: the draws are bit-identical across backends)."""
    return a.size == b.size and all(np.array_equal(getattr(a, f.name), getattr(b, f.name))
                                    for f in fields(BatchViewParams) if f.name != "size")
