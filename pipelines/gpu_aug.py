"""Batched colour augmentation, blur, solarize and normalisation on torch tensors (CPU or CUDA).

Every crop of a batch gets the SwAV colour chain of :class:`~pipelines.spec.MultiCropSpec`
(``RandomApply(ColorJitter)``, ``RandomGrayscale``, Gaussian blur, solarize, normalise) without a
per-image Python loop.  Work in RGB with values ``x`` in [0, 1] (``x = u8 / 255``).

Colour as per-sample 3x3 affine steps
-------------------------------------
With luma weights ``w = (0.299, 0.587, 0.114)`` (ITU-R 601, PIL's ``"L"``) and ``1 = (1, 1, 1)``,
every jitter op is affine in RGB:

* brightness ``b``:  ``x' = b x``
* contrast ``c``:    ``x' = c x + (1 - c) m 1`` with ``m = w . mean(x)`` (mean over the pixels of the
  *current* image, a scalar per sample)
* saturation ``s``:  ``x' = (s I + (1 - s) 1 w^T) x``
* hue ``h``:         ``x' = R(2 pi h) x``, a rotation about the gray axis ``1 / sqrt(3)``:
  ``R(a) = cos(a) I + (1 - cos(a)) J / 3 + sin(a) K / sqrt(3)``, ``J = 1 1^T``, ``K`` the cross-product
  matrix of ``1`` (``K = [[0, -1, 1], [1, 0, -1], [-1, 1, 0]]``)
* grayscale:         ``x' = 1 w^T x``

:func:`colour_steps` turns a sample's parameters into five steps ``(A_k, a_k)`` -- the four jitter ops
in the sample's random order, then grayscale (or identity) -- and the kernel applies them per pixel
with torchvision's clamp after each: ``y <- clamp(A_k y + a_k, 0, 1)``, ``k = 1..5`` (five 3x3
products in registers: the same memory traffic as one matrix).  Contrast needs the mean of the
current image; it is *propagated*, not recomputed: the channel means start at ``mu0`` (the input
crop's) and follow each step, ``mu <- clamp(A_k mu + a_k, 0, 1)``, so contrast's offset is
``a = (1 - c) (w . mu) 1``.  Without clamping the five steps compose to one affine map
``y = M x + t`` (:func:`colour_matrices`), whose mean propagation is exact.

Differences from torchvision / PIL (documented tolerances, tested in ``tests/test_gpu_aug.py``):

* contrast's mean is the propagated one: it differs from the real mean only when an earlier op
  clamped pixels (e.g. a bright crop after brightness > 1).  PIL also rounds to uint8 after every op.
* hue: torchvision / PIL shift the hue angle in HSV space, which is not linear in RGB.  The rotation
  about the gray axis agrees exactly for gray pixels and for shifts by multiples of 1/3; for random
  colours and ``|h| <= 0.2`` the mean absolute difference is about 0.05 (at most ~0.08) of 1.

Blur, solarize, normalise
-------------------------
Gaussian blur (after colour, as in the reference) is separable:
``g_s(k) = exp(-k^2 / (2 sigma^2)) / sum_j exp(-j^2 / (2 sigma^2))`` for ``|k| <= R``,
``R = ceil(3 sigma_max)``, edges replicated (as PIL's ``GaussianBlur(radius=sigma)``, whose box-blur
approximation it matches to within a few 1/255).  It runs only on the samples that drew it, each with
its own sigma.  Solarize inverts values ``>= 0.5``: ``y' = 1 - y``.  Normalisation:
``out = (y - mean) / std``, cast to the spec's dtype, channels-last when the spec asks for it.

On CUDA the pointwise chain (colour steps and clamps, blur taps, solarize, normalise, cast) is one
``torch.compile``'d function per path (with and without blur); on CPU it runs eagerly.  Both compute
the same maths.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.errors import ConfigError

from .params import BatchViewParams, params_from_uniforms, view_uniforms
from .spec import MultiCropSpec

log = logging.getLogger("pipelines")

#: ITU-R 601-2 luma weights (PIL ``convert("L")``; torchvision's float ``rgb_to_grayscale`` has 0.2989
#: for red).
LUMA = (0.299, 0.587, 0.114)
#: Solarize threshold on [0, 1] values.
SOLARIZE_THRESHOLD = 0.5
__all__ = [
    "ColourParams",
    "LUMA",
    "augment_views",
    "blur_radius",
    "colour_matrices",
    "colour_steps",
    "colour_params_from_batch",
    "constant",
    "compiled_kernels",
    "gaussian_weights",
    "hue_rotation",
    "sample_colour_params",
    "set_compile",
]


@dataclass
class ColourParams:
    """Per-sample colour parameters of ``B`` crops, as tensors on one device.

    ``jitter``, ``grayscale``, ``solarize``: bool [B]; ``brightness``, ``contrast``, ``saturation``:
    float32 [B] factors (1 = unchanged); ``hue``: float32 [B] in [-0.5, 0.5] (0 = unchanged);
    ``order``: int64 [B, 4], the order of (brightness=0, contrast=1, saturation=2, hue=3);
    ``blur_sigma``: float32 [B], 0 = no blur.  Factors are neutral where ``jitter`` is False.
    """

    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self) -> int:
        return int(self.jitter.shape[0])

    @property
    def device(self) -> torch.device:
        return self.jitter.device

    def to(self, device: Any, non_blocking: bool = False) -> "ColourParams":
        """The same parameters on ``device``."""
        return ColourParams(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in fields(self)})

    def select(self, index: torch.Tensor) -> "ColourParams":
        """The parameters of the samples ``index`` (int64 indices or a bool mask)."""
        return ColourParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def cat(parts: list["ColourParams"]) -> "ColourParams":
        """Concatenate along the batch dimension (e.g. all views of one resolution)."""
        if not parts:
            raise ValueError("ColourParams.cat needs at least one part")
        return ColourParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                               for f in fields(ColourParams)})


# -- constants ------------------------------------------------------------------------------------
_CONSTANTS: dict[tuple, torch.Tensor] = {}
_HUE_K = ((0.0, -1.0, 1.0), (1.0, 0.0, -1.0), (-1.0, 1.0, 0.0))


def constant(values: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """A small constant tensor (nested tuples/lists of numbers), built once per (values, dtype, device).

    ``torch.tensor(list, device=cuda)`` is a blocking host-to-device copy; building the same few
    constants on every batch cost several synchronisations per batch. The cached tensors are shared:
    never modify one in place.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (_frozen(values), dtype, dev)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype, device=dev)
    return t


def _frozen(values: Any) -> Any:
    """Nested tuples of Python numbers (a dictionary key)."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return tuple(_frozen(v) for v in values)
    return int(values) if isinstance(values, (bool, int, np.integer)) else float(values)


# -- parameters -----------------------------------------------------------------------------------
def sample_colour_params(spec: MultiCropSpec, indices: int | Sequence[int] | np.ndarray, seed: int = 0,
                         epoch: int = 0, view: int = 0, device: Any = None) -> ColourParams:
    """The colour parameters of view ``view`` of samples ``indices`` (an int ``n``: samples ``0..n-1``)
    in ``epoch``: the shared draw of :func:`pipelines.params.sample_params_for_indices` (the same
    values every backend applies), made on the host and moved to ``device`` (default: CPU).

    Distributions (:func:`pipelines.params.params_from_uniforms`): jitter with probability
    ``jitter_p``; brightness / contrast / saturation factors uniform in ``[max(0, 1 - m), 1 + m]`` and
    hue uniform in ``[-h, h]`` with ``(m, m, m, h) = spec.jitter_factors``; the order uniform over the
    24 permutations; grayscale with ``grayscale_p``; blur with ``blur_p`` and sigma uniform in
    ``spec.blur_sigma``; solarize with ``solarize_p``.
    """
    if isinstance(indices, (int, np.integer)):
        if indices < 0:
            raise ConfigError(f"batch_size: must be >= 0, got {indices}")
        indices = np.arange(int(indices))
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0 <= view < spec.num_views:
        raise ConfigError(f"view: must be in [0, {spec.num_views}), got {view}")
    ones = np.ones(len(idx), dtype=np.int64)  # the colour slots do not depend on the image size
    p = params_from_uniforms(spec, view, ones, ones, view_uniforms(seed, epoch, idx, view))
    return colour_params_from_batch(p, "cpu" if device is None else device)


def colour_params_from_batch(p: BatchViewParams, device: Any = "cpu") -> ColourParams:
    """The colour part of host-drawn :class:`~pipelines.params.BatchViewParams` as tensors on ``device``."""
    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a)).to(dtype)

    out = ColourParams(
        jitter=t(p.jitter, torch.bool), brightness=t(p.brightness, torch.float32),
        contrast=t(p.contrast, torch.float32), saturation=t(p.saturation, torch.float32),
        hue=t(p.hue, torch.float32), order=t(p.jitter_order, torch.int64),
        grayscale=t(p.grayscale, torch.bool),
        blur_sigma=t(p.blur_sigma, torch.float32), solarize=t(p.solarize, torch.bool))
    return out if torch.device(device).type == "cpu" else out.to(device, non_blocking=True)


# -- colour matrices ------------------------------------------------------------------------------
def hue_rotation(hue: torch.Tensor) -> torch.Tensor:
    """``R(2 pi h)`` [B, 3, 3]: rotation of RGB about the gray axis by the hue shift ``h`` (in turns)."""
    a = hue.to(torch.float32) * (2.0 * math.pi)
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    eye = torch.eye(3, device=hue.device)
    third = torch.full((3, 3), 1.0 / 3.0, device=hue.device)
    k = constant(_HUE_K, torch.float32, hue.device) / math.sqrt(3.0)
    return cos * eye + (1.0 - cos) * third + sin * k


def colour_steps(params: ColourParams, channel_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample affine colour steps ``(A [B, 5, 3, 3], a [B, 5, 3])``, applied as
    ``y <- clamp(A_k y + a_k, 0, 1)`` for ``k = 0..4``.

    Steps 0-3 are the jitter ops in each sample's ``order`` (neutral factors give identity steps);
    step 4 is grayscale ``1 w^T`` or the identity.  ``channel_means`` [B, 3] are the input crops' RGB
    means on the [0, 1] scale (``mu0``); contrast uses the luma of the propagated means
    ``mu <- clamp(A_k mu + a_k, 0, 1)``.
    """
    dev = channel_means.device
    n = len(params)
    f32 = torch.float32
    w = constant(LUMA, f32, dev)
    eye = torch.eye(3, dtype=f32, device=dev).expand(n, 3, 3)
    ones_w = torch.ones(3, 1, dtype=f32, device=dev) * w[None, :]  # 1 w^T
    b = params.brightness.to(dev, f32)[:, None, None]
    c = params.contrast.to(dev, f32)
    s = params.saturation.to(dev, f32)[:, None, None]
    mats = torch.stack([b * eye,                                   # 0: brightness
                        c[:, None, None] * eye,                    # 1: contrast (offset below)
                        s * eye + (1.0 - s) * ones_w,              # 2: saturation
                        hue_rotation(params.hue.to(dev))], dim=1)  # 3: hue          -> [B, 4, 3, 3]
    order = params.order.to(dev)
    rows = torch.arange(n, device=dev)
    mu = channel_means.to(f32)
    steps, offsets = [], []
    for k in range(4):
        op = order[:, k]
        a = mats[rows, op]                                                        # [B, 3, 3]
        off = torch.where(op == 1, (1.0 - c) * (mu @ w), torch.zeros_like(c))[:, None].expand(n, 3)
        mu = ((a @ mu[:, :, None]).squeeze(-1) + off).clamp(0.0, 1.0)
        steps.append(a)
        offsets.append(off)
    steps.append(torch.where(params.grayscale.to(dev)[:, None, None], ones_w.expand(n, 3, 3), eye))
    offsets.append(torch.zeros(n, 3, dtype=f32, device=dev))
    return torch.stack(steps, dim=1), torch.stack(offsets, dim=1)


def colour_matrices(params: ColourParams, channel_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The five steps of :func:`colour_steps` composed into one map ``(M [B, 3, 3], t [B, 3])``,
    ``y = M x + t``: equal to the stepwise chain wherever no intermediate value leaves [0, 1]."""
    a, off = colour_steps(params, channel_means)
    m = a[:, 0]
    t = off[:, 0]
    for k in range(1, a.shape[1]):
        m = a[:, k] @ m
        t = (a[:, k] @ t[:, :, None]).squeeze(-1) + off[:, k]
    return m, t


def blur_radius(spec: MultiCropSpec) -> int:
    """Half-width ``R = ceil(3 sigma_max)`` of the blur kernel for the spec's largest sigma."""
    return max(1, math.ceil(3.0 * spec.blur_sigma[1]))


def gaussian_weights(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps [B, 2R+1] for per-sample ``sigma`` [B] (> 0)."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    sig = sigma.to(torch.float32).clamp_min(1e-6)[:, None]
    g = torch.exp(-(k[None, :] ** 2) / (2.0 * sig * sig))
    return g / g.sum(dim=1, keepdim=True)


# -- the pointwise kernels ------------------------------------------------------------------------
def _colour(x: torch.Tensor, a: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """``y <- clamp(A_k y + a_k, 0, 1)`` over the steps, from ``y = x / 255``: [n, 3, H, W] float32 from
    uint8 (or 0..255 float) crops."""
    xf = x.to(torch.float32) * (1.0 / 255.0)
    ch = [xf[:, 0], xf[:, 1], xf[:, 2]]
    for k in range(a.shape[1]):
        m, t = a[:, k, :, :, None, None], off[:, k, :, None, None]
        ch = [(m[:, i, 0] * ch[0] + m[:, i, 1] * ch[1] + m[:, i, 2] * ch[2] + t[:, i]).clamp(0.0, 1.0)
              for i in range(3)]
    return torch.stack(ch, dim=1)


def _blur(y: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable per-sample blur of ``y`` [n, 3, H, W] with ``taps`` [n, 2R+1], edges replicated."""
    r = (taps.shape[1] - 1) // 2
    h, w = y.shape[-2:]
    wt = taps[:, :, None, None, None]
    p = F.pad(y, (r, r, 0, 0), mode="replicate")
    y = sum(wt[:, k] * p[..., k:k + w] for k in range(2 * r + 1))
    p = F.pad(y, (0, 0, r, r), mode="replicate")
    return sum(wt[:, k] * p[..., k:k + h, :] for k in range(2 * r + 1))


def _finish(y: torch.Tensor, solarize: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Solarize the flagged samples, then ``y * (1 / std) - mean / std``, cast and lay out."""
    y = torch.where(solarize[:, None, None, None] & (y >= SOLARIZE_THRESHOLD), 1.0 - y, y)
    out = (y * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _plain_path(x: torch.Tensor, m: torch.Tensor, t: torch.Tensor, solarize: torch.Tensor,
                scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, channels_last: bool
                ) -> torch.Tensor:
    return _finish(_colour(x, m, t), solarize, scale, shift, dtype, channels_last)


def _blur_path(x: torch.Tensor, m: torch.Tensor, t: torch.Tensor, taps: torch.Tensor, solarize: torch.Tensor,
               scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, channels_last: bool
               ) -> torch.Tensor:
    return _finish(_blur(_colour(x, m, t), taps), solarize, scale, shift, dtype, channels_last)


class _MaybeCompiled:
    """``fn`` compiled with ``torch.compile(dynamic=True)`` for CUDA inputs; eager on CPU or after a
    compiler failure."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> torch.Tensor:
        if not _COMPILE["enabled"] or self.failed or args[0].device.type != "cuda":
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: same maths, eagerly
            self.failed = True
            log.warning("torch.compile of %s failed (%s: %s); using the eager version", self.fn.__name__,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return self.fn(*args)


_COMPILE = {"enabled": True}
_PLAIN = _MaybeCompiled(_plain_path)
_BLURRED = _MaybeCompiled(_blur_path)


def set_compile(enabled: bool) -> None:
    """Use (default) or skip the ``torch.compile``'d kernels on CUDA."""
    _COMPILE["enabled"] = bool(enabled)


def compiled_kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``(plain, blurred)`` compiled on any device (for tests comparing compiled and eager maths)."""
    return torch.compile(_plain_path, dynamic=True), torch.compile(_blur_path, dynamic=True)


# -- the public entry point -----------------------------------------------------------------------
def augment_views(crops: torch.Tensor, params: ColourParams, spec: MultiCropSpec,
                  kernels: tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None = None
                  ) -> torch.Tensor:
    """Colour-jitter, grayscale, blur, solarize and normalise a batch of crops.

    ``crops``: [B, 3, S, S] uint8 (or float in [0, 255]), already cropped, resized and flipped, any
    memory format.  ``params``: :class:`ColourParams` of length B (on any device; host-side params
    let the blur split happen without a device sync).  Returns [B, 3, S, S] in ``spec.dtype``,
    channels-last when ``spec.channels_last``, on ``crops.device``.  ``kernels`` overrides the
    ``(plain, blurred)`` implementations (tests).
    """
    if crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be [B, 3, H, W], got {tuple(crops.shape)}")
    n = crops.shape[0]
    if len(params) != n:
        raise ValueError(f"{len(params)} colour parameter rows for {n} crops")
    dev = crops.device
    dtype = spec.torch_dtype
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    if n == 0:
        return torch.empty((0, 3, *crops.shape[2:]), dtype=dtype, device=dev).contiguous(memory_format=fmt)
    plain_fn, blur_fn = kernels if kernels is not None else (_PLAIN, _BLURRED)

    blur_mask = params.blur_sigma > 0
    # Split on the host when the params live there (no device sync); else nonzero() syncs once.
    blur_idx = torch.nonzero(blur_mask).flatten()
    plain_idx = torch.nonzero(~blur_mask).flatten()
    p = params.to(dev, non_blocking=True)
    mu = crops.sum(dim=(2, 3), dtype=torch.float32) * (1.0 / (255.0 * crops.shape[2] * crops.shape[3]))
    m, t = colour_steps(p, mu)
    std = constant(spec.std, torch.float32, dev)
    mean = constant(spec.mean, torch.float32, dev)
    scale, shift = 1.0 / std, -mean / std
    cl = bool(spec.channels_last)
    if len(blur_idx) == 0:
        return plain_fn(crops, m, t, p.solarize, scale, shift, dtype, cl)
    taps = gaussian_weights(p.blur_sigma, blur_radius(spec))
    if len(plain_idx) == 0:
        return blur_fn(crops, m, t, taps, p.solarize, scale, shift, dtype, cl)
    bi, pi = blur_idx.to(dev, non_blocking=True), plain_idx.to(dev, non_blocking=True)
    out = torch.empty((n, 3, *crops.shape[2:]), dtype=dtype, device=dev).contiguous(memory_format=fmt)
    out.index_copy_(0, pi, plain_fn(crops[pi], m[pi], t[pi], p.solarize[pi], scale, shift, dtype, cl))
    blurred = blur_fn(crops[bi], m[bi], t[bi], taps[bi], p.solarize[bi], scale, shift, dtype, cl)
    out.index_copy_(0, bi, blurred)
    return out
