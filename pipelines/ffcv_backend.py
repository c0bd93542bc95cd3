"""FFCV backend: multi-crop from a prepared ``.beton`` (``swav-fast prepare --format beton``).

Each view is its own FFCV pipeline on the same ``image`` field: JPEG decode + crop + resize in
FFCV's compiled (numba, multi-threaded) code, then ``ToTensor`` (``ToDevice`` on CUDA) and
``ToTorchImage``.  The crop is not FFCV's RandomResizedCrop: the decoder (:func:`table_crop_decoder`)
reads each sample's box from a per-view crop table that the loader fills before every pass from
:func:`~pipelines.params.crop_boxes_for_indices` (the contract every backend shares).  Flip,
colour jitter (random order), grayscale, Gaussian blur, solarize and normalisation run batched in
torch, on the GPU when the loader's device is CUDA and on the CPU otherwise.  FFCV's
``NormalizeImage`` is not used (placed after ``ToTensor`` it hangs, libffcv/ffcv#396).

Sample order, rank sharding and ``start_batch`` resume are the base :class:`MultiCropLoader`'s
(fed to FFCV as a fixed traversal order).  Crop boxes, flips and colour/blur parameters all come
from :func:`~pipelines.params.sample_params_for_indices`, so they depend only on ``(seed, epoch,
index, view)``: the same boxes as the other backends for the same seed, and resume is exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines.errors import ConfigError, DataError

from .folder import ImageFolderIndex
from .formats.beton import BetonIndex, BetonSource, open_beton_index
from .loader import MultiCropBatch, MultiCropLoader, register_backend
from .options import FfcvOptions
from .params import BatchViewParams, crop_boxes_for_indices, sample_params_for_indices
from .spec import MultiCropSpec

#: What this backend reads (:mod:`pipelines.formats`); the README's backend table lists it.
FORMATS = ("beton",)
#: Luma weights of torchvision's rgb_to_grayscale (ITU-R 601, as PIL's convert("L") up to rounding).
_LUMA = (0.2989, 0.587, 0.114)


# ----------------------------------------------------------------------------- batched torch ops
def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``clamp(f * a + (1 - f) * b, 0, 1)`` with per-sample ``f`` (torchvision's adjust_* on floats)."""
    f = f.view(-1, 1, 1, 1)
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma ``0.2989 R + 0.587 G + 0.114 B``."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample) via HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = torch.stack(
        [
            torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1),
            torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1),
            torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1),
        ],
        1,
    )
    return rgb.clamp_(0.0, 1.0)


def _jitter_op(k: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if k == 0:  # brightness: blend with black
        return _blend(x, torch.zeros_like(x), factor)
    if k == 1:  # contrast: blend with the mean luma of the image
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if k == 2:  # saturation: blend with the luma image
        return _blend(x, _gray(x), factor)
    return adjust_hue(x, factor)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, per-sample ``sigma`` (0 = unchanged); kernel radius ``ceil(3 sigma_max)``.

    ``k(t) = exp(-t^2 / (2 sigma^2)) / sum``, reflect padding (radius capped at size - 1).
    """
    B, C, H, W = x.shape
    if B == 0 or not bool((sigma > 0).any()):
        return x
    radius = max(1, min(int(math.ceil(3.0 * float(sigma.max()))), H - 1, W - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp(min=1e-6).view(-1, 1)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * s * s))
    k = k / k.sum(1, keepdim=True)
    ident = torch.zeros_like(k)
    ident[:, radius] = 1.0
    k = torch.where((sigma > 0).view(-1, 1), k, ident)
    k = k.repeat_interleave(C, 0)  # [B*C, K]
    y = torch.nn.functional.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)


def _as_tensor(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), device=device, dtype=dtype)


def augment_batch(
    view: torch.Tensor, p: BatchViewParams, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Flip, jitter (per-sample order), grayscale, blur, solarize, normalise a uint8 [B, 3, S, S] crop batch.

    Returns float32 [B, 3, S, S] on ``view``'s device; the operations of :func:`pipelines.pil.augment_view`.
    """
    dev = view.device
    x = view.to(torch.float32).div_(255.0)
    flip = _as_tensor(p.flip, dev, torch.bool)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    jitter = np.asarray(p.jitter, dtype=bool)
    if jitter.any():
        factors = [_as_tensor(a, dev, torch.float32) for a in (p.brightness, p.contrast, p.saturation, p.hue)]
        order = np.asarray(p.jitter_order)
        for pos in range(4):
            for k in range(4):
                rows = np.nonzero(jitter & (order[:, pos] == k))[0]
                if len(rows):
                    r = _as_tensor(rows, dev, torch.int64)
                    x[r] = _jitter_op(k, x[r], factors[k][r])
    gray = _as_tensor(p.grayscale, dev, torch.bool)
    if bool(np.any(p.grayscale)):
        x = torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    x = gaussian_blur(x, _as_tensor(p.blur_sigma, dev, torch.float32))
    if bool(np.any(p.solarize)):
        sol = _as_tensor(p.solarize, dev, torch.bool).view(-1, 1, 1, 1)
        x = torch.where(sol & (x >= 128.0 / 255.0), 1.0 - x, x)
    return x.sub_(mean).div_(std)


# ----------------------------------------------------------------------------- the loader
def _import_ffcv() -> Any:
    try:
        import ffcv  # noqa: F401
        from ffcv import loader as ffcv_loader
    except ImportError as exc:
        raise ConfigError(
            "the ffcv backend needs FFCV: apt-get install libturbojpeg0-dev libopencv-dev "
            f"pkg-config, then pip install -e '.[ffcv]' ({exc})"
        ) from None
    return ffcv_loader


def table_crop_decoder(output_size: tuple[int, int], num_samples: int) -> Any:
    """An FFCV RGB decoder that crops sample ``i`` to ``table[i] = (top, left, height, width)`` (source
    pixels) and resizes it to ``output_size``; ``decoder.table`` (int32 [num_samples, 4]) is filled in
    place before a pass and read by the compiled code at run time.

    numba freezes arrays captured by a compiled function, so the compiled decoder reads the table through
    its address (the array is never reallocated, and the decoder holds it alive).
    """
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class TableCropDecoder(ResizedCropRGBImageDecoder):
        def __init__(self) -> None:
            super().__init__(output_size)
            self.table = np.zeros((num_samples, 4), dtype=np.int32)

        @property
        def get_crop_generator(self) -> Any:  # the abstract hook of the base class; the table replaces it
            raise NotImplementedError

        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            read_table = _table_reader(self.table, Compiler.is_enabled)

            def decode(batch_indices, my_storage, metadata, storage_state):  # noqa: ANN001 - numba
                destination, temp_storage = my_storage
                table = read_table()
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                                   False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j = table[source_ix, 0], table[source_ix, 1]
                    h, w = table[source_ix, 2], table[source_ix, 3]
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return TableCropDecoder()


def _table_reader(table: np.ndarray, compiled: bool) -> Any:
    """A function returning ``table``, callable from FFCV's compiled code (which would freeze a captured
    array): it rebuilds the array from its address and shape on every call."""
    if not compiled:
        return lambda: table
    import numba
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def as_pointer(typingctx: Any, address: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(address), codegen

    address, shape = int(table.ctypes.data), table.shape

    @numba.njit(nogil=True)
    def read() -> Any:
        return numba.carray(as_pointer(address), shape, np.int32)

    return read


def fill_crop_tables(tables: Sequence[np.ndarray], spec: MultiCropSpec, seed: int, epoch: int,
                     indices: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> None:
    """Write the crop boxes ``(top, left, height, width)`` of views ``0..V-1`` of samples ``indices`` in
    ``epoch`` into ``tables[v][i]`` (the shared draw: :func:`~pipelines.params.crop_boxes_for_indices`)."""
    idx = np.unique(np.asarray(indices, dtype=np.int64))
    for start in range(0, len(idx), 1 << 16):  # bounded host memory for any dataset size
        part = idx[start:start + (1 << 16)]
        boxes = crop_boxes_for_indices(spec, seed, epoch, part, widths[part], heights[part])
        for table, b in zip(tables, boxes):
            table[part] = b


def _external_order_class() -> type:
    from ffcv.traversal_order.base import TraversalOrder

    class ExternalOrder(TraversalOrder):
        """A fixed order set from outside before every pass (FFCV instantiates ``order(loader)``)."""

        def __init__(self, order: np.ndarray) -> None:  # noqa: D401 - not calling super: no loader yet
            self.order = order

        def __call__(self, loader: Any) -> "ExternalOrder":
            self.loader = loader
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.order

    return ExternalOrder


class FFCVLoader(MultiCropLoader):
    """Multi-crop batches from a ``.beton``; ``num_workers`` = FFCV decode threads (0 -> 1)."""

    def __init__(
        self,
        index: ImageFolderIndex | str | os.PathLike[str],
        spec: MultiCropSpec,
        batch_size: int,
        device: Any = "cpu",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
        os_cache: bool = FfcvOptions.os_cache,
        batches_ahead: int = FfcvOptions.batches_ahead,
    ) -> None:
        if not isinstance(index, BetonIndex):
            if isinstance(index, ImageFolderIndex):
                raise ConfigError(
                    "the ffcv backend reads a prepared .beton, not an image folder: prepare it with "
                    "'swav-fast prepare --format beton' and pass "
                    "build_loader(open_beton_index(DIR), ..., backend='ffcv')"
                )
            index = open_beton_index(index)
        super().__init__(index, spec, batch_size, device, rank, world_size, seed, drop_last)
        if num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {num_workers}")
        FfcvOptions(os_cache=os_cache, batches_ahead=batches_ahead)  # checks the values
        ffcv_loader = _import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        self.beton = index.beton
        on_gpu = self.device.type == "cuda"
        to_dev = [ToDevice(self.device, non_blocking=True)] if on_gpu else []
        pipelines: dict[str, Any] = {"label": [IntDecoder(), ToTensor(), Squeeze(), *to_dev]}
        self._view_names = []
        self._tables: list[np.ndarray] = []
        for v, size in enumerate(spec.view_sizes):
            name = "image" if v == 0 else f"image_{v}"
            decoder = table_crop_decoder((size, size), len(index))
            self._tables.append(decoder.table)
            ops = [ToTensor(), *to_dev, ToTorchImage(channels_last=False)]
            pipelines[name] = (
                [decoder, *ops] if v == 0 else PipelineSpec("image", decoder=decoder, transforms=ops)
            )
            self._view_names.append(name)
        self._order = _external_order_class()(np.asarray(self.epoch_indices(0), dtype=np.uint64))
        self._ffcv = ffcv_loader.Loader(
            self.beton,
            batch_size=self.batch_size,
            num_workers=max(1, int(num_workers)),
            os_cache=os_cache,
            order=self._order,
            pipelines=pipelines,
            drop_last=False,
            batches_ahead=batches_ahead,
        )
        names = list(self._ffcv.pipeline_specs)
        self._slots = [names.index(n) for n in self._view_names]
        self._label_slot = names.index("label")
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
        self._widths, self._heights = index.widths, index.heights

    def _iterate(self, epoch: int, batches: list[np.ndarray]) -> Iterator[MultiCropBatch]:
        if not batches:
            return
        order = np.concatenate(batches)
        fill_crop_tables(self._tables, self.spec, self.seed, epoch, order, self._widths, self._heights)
        self._order.order = order.astype(np.uint64)
        dtype = self.spec.torch_dtype
        it = iter(self._ffcv)
        try:
            for b, out in zip(batches, it):
                idx = np.asarray(b, dtype=np.int64)
                params = sample_params_for_indices(
                    self.spec, self.seed, epoch, idx, self._widths[idx], self._heights[idx]
                )
                views = [
                    augment_batch(out[s], params[v], self._mean, self._std)
                    .to(dtype)
                    .contiguous(memory_format=self._fmt)
                    for v, s in enumerate(self._slots)
                ]
                labels = out[self._label_slot].to(torch.int64).reshape(-1).clone()
                yield MultiCropBatch(views=views, labels=labels, indices=torch.as_tensor(idx), num_bad=0,
                                     params=params if self.record_params else None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        """FFCV's decode threads end with each pass; nothing is held between passes."""


def build_ffcv_loader(
    index: ImageFolderIndex | str | os.PathLike[str], spec: MultiCropSpec, batch_size: int, **kwargs: Any
) -> FFCVLoader:
    """The ``build_loader`` factory for ``backend="ffcv"``."""
    return FFCVLoader(index, spec, batch_size, **kwargs)


build_ffcv_loader.accepts_path = True  # type: ignore[attr-defined]  # a prepared folder or .beton path
register_backend("ffcv", build_ffcv_loader, options=FfcvOptions)
