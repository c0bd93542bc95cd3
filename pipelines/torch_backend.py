"""The ``torch`` loader backend: no extra dependency, batched work on the GPU (or the CPU for CI).

Per batch:

1. **read** the encoded samples with a thread pool, from any format :func:`pipelines.formats.open_source`
   opens here (an ImageFolder, TFRecord or webdataset shards);
2. **decode** all JPEGs of the batch in one :func:`pipelines.decode.decode_jpegs_each` call (TorchCodec's
   ``decode_jpeg(list, device=...)``: nvJPEG batched on CUDA, libjpeg-turbo on CPU; torchvision.io only
   when TorchCodec is missing; ``decoder`` chooses); other formats, and JPEGs the batched call
   rejects, go one by one through PIL.  Unreadable files (truncated, corrupt, not an image,
   decompression bombs; :mod:`pipelines.formats.probe` checks each JPEG header first) go through the
   loader's :class:`~pipelines.badsamples.BadSamples` policy (replaced by the next readable sample, or
   skipped) and are counted, as in every backend;
3. **params**: crop boxes, flips and colour parameters for all views, vectorised over the batch by
   :func:`pipelines.params.sample_params_for_indices`: a function of (seed, epoch, sample index,
   view), the same draws as every other backend (resume is exact);
4. **crop + resize + flip** per resolution group as two batched matrix products (:func:`crop_resize_flip`):
   ``crop_v = R_v(box) . image . R_h(box)^T``, where the rows of ``R`` are PIL's bilinear
   (triangle-filter, antialiased) resampling weights restricted to the crop box; a horizontal flip
   reverses the rows of ``R_h``.  This is the reference's ``img.crop(box).resize((S, S), BILINEAR)``
   up to rounding;
5. **augment**: :func:`pipelines.gpu_aug.augment_views` (colour matrix, grayscale, blur, solarize,
   normalise; compiled on CUDA).

Batches are produced by a :class:`pipelines.prefetch.Prefetcher` thread, on a side CUDA stream on GPU,
``prefetch`` batches ahead
of the training step; the consumer's stream waits on an event (no host sync).
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines.errors import ConfigError, DataError

from .badsamples import BadSamples
from .decode import decode_jpegs_each, resolve_decoder
from .formats.probe import BadImage, is_jpeg, jpeg_size
from .formats.sources import open_source
from .gpu_aug import augment_views, colour_params_from_batch
from .loader import MultiCropBatch, MultiCropLoader, register_backend
from .options import TorchOptions
from .params import BatchViewParams, concat_params, sample_params_for_indices, split_params
from .pil import decode_rgb
from .prefetch import Prefetcher
from .spec import MultiCropSpec

log = logging.getLogger("pipelines")

#: A chunk of images shares one zero-padded canvas while canvas pixels <= this factor x image pixels.
CANVAS_WASTE = 1.5
#: What this backend reads (:mod:`pipelines.formats`); the README's backend table lists it.
FORMATS = ("folder", "tfrecord", "wds")


# -- read + decode ----------------------------------------------------------------------------------
def _decode_other(data: bytes | bytearray) -> torch.Tensor:
    """Any format PIL reads (PNG, WebP, BMP, CMYK JPEG, ...), with the PIL backend's checks:
    [3, H, W] uint8."""
    img = decode_rgb(io.BytesIO(data))  # type: ignore[arg-type]  # PIL opens file objects too
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def decode_images(datas: Sequence[bytes | bytearray | BaseException], device: Any, decoder: str = "auto"
                  ) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode a batch: ``(images [3, H, W] uint8 on device, or None; error message per item, or None)``.

    All JPEGs that pass :func:`pipelines.formats.probe.jpeg_size` go through one batched
    :func:`pipelines.decode.decode_jpegs_each` call (``decoder``: TorchCodec by default, torchvision.io
    when it is missing); JPEGs it rejects and other formats go one by one through PIL, so one bad file
    never costs the batch.
    """
    dev = torch.device(device)
    n = len(datas)
    images: list[torch.Tensor | None] = [None] * n
    errors: list[str | None] = [None] * n
    jpegs: list[int] = []
    others: list[int] = []
    for i, d in enumerate(datas):
        if isinstance(d, BaseException):
            errors[i] = f"{type(d).__name__}: {d}"
        elif is_jpeg(d):
            try:
                jpeg_size(d)
                jpegs.append(i)
            except BadImage as e:
                errors[i] = str(e)
        else:
            others.append(i)
    if jpegs:
        decoded, _ = decode_jpegs_each([datas[i] for i in jpegs], dev, decoder)  # type: ignore[misc]
        for i, img in zip(jpegs, decoded):
            if img is None:
                others.append(i)  # e.g. CMYK: PIL reads it
            else:
                images[i] = img
    for i in others:
        try:
            images[i] = _decode_other(datas[i]).to(dev)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            errors[i] = f"{type(e).__name__}: {e}"
    return images, errors


# -- crop + resize + flip -----------------------------------------------------------------------------
def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                    flip: torch.Tensor | None = None) -> torch.Tensor:
    """PIL bilinear resampling of the window ``[start, start + length)`` to ``out_size`` samples, as
    dense matrices ``[R, out_size, in_size]`` (float32) over the full input axis.

    With ``scale = length / out_size`` and ``f = max(scale, 1)`` (antialiasing when shrinking), output
    ``j`` is centred at ``c_j = start + (j + 1/2) scale`` and input pixel ``x`` (centre ``x + 1/2``)
    has weight ``max(0, 1 - |x + 1/2 - c_j| / f)`` if it lies in the window, else 0; each row is
    normalised to sum 1 (PIL's ``precompute_coeffs`` for the triangle filter).  ``flip`` reverses the
    rows of the flagged windows.
    """
    dev = start.device
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)
    j = torch.arange(out_size, dtype=torch.float32, device=dev)[None, :, None]
    x = torch.arange(in_size, dtype=torch.float32, device=dev)[None, None, :]
    centre = start + (j + 0.5) * scale
    w = torch.clamp(1.0 - (x + 0.5 - centre).abs() / support, min=0.0)
    w = w * ((x >= start) & (x < start + length))
    w = w / w.sum(dim=2, keepdim=True).clamp_min(1e-12)
    if flip is not None:
        w = torch.where(flip.to(dev)[:, None, None], w.flip(1), w)
    return w


def _size_chunks(heights: np.ndarray, widths: np.ndarray, waste: float = CANVAS_WASTE) -> list[np.ndarray]:
    """Group images (largest first) so that each group's padded canvas wastes at most ``waste`` x pixels."""
    order = np.argsort(-(heights.astype(np.int64) * widths), kind="stable")
    chunks: list[list[int]] = []
    cur: list[int] = []
    hmax = wmax = area = 0
    for i in order.tolist():
        h, w = int(heights[i]), int(widths[i])
        nh, nw, na = max(hmax, h), max(wmax, w), area + h * w
        if cur and nh * nw * (len(cur) + 1) > waste * na:
            chunks.append(cur)
            cur, nh, nw, na = [], h, w, h * w
        cur.append(i)
        hmax, wmax, area = nh, nw, na
    if cur:
        chunks.append(cur)
    return [np.array(sorted(c), dtype=np.int64) for c in chunks]


@dataclass
class Canvases:
    """A batch of images zero-padded into shared canvases: ``chunks[c]`` holds images ``ids[c]``."""

    ids: list[np.ndarray]
    chunks: list[torch.Tensor]   # [k, 3, Hc, Wc] float16 (CUDA) / float32 (CPU)
    num_images: int

    @property
    def device(self) -> torch.device:
        return self.chunks[0].device


def make_canvases(images: Sequence[torch.Tensor]) -> Canvases:
    """Pad ``images`` ([3, H_i, W_i] uint8 on one device) into canvases of similar-size chunks (built once
    per batch, shared by all views)."""
    if not images:
        raise ValueError("make_canvases needs at least one image")
    dev = images[0].device
    ctype = torch.float16 if dev.type == "cuda" else torch.float32
    hs = np.array([im.shape[1] for im in images], dtype=np.int64)
    ws = np.array([im.shape[2] for im in images], dtype=np.int64)
    ids = _size_chunks(hs, ws)
    chunks = []
    for group in ids:
        shape = (len(group), 3, int(hs[group].max()), int(ws[group].max()))
        canvas = torch.zeros(shape, dtype=ctype, device=dev)
        for j, i in enumerate(group.tolist()):
            canvas[j, :, :hs[i], :ws[i]].copy_(images[i])
        chunks.append(canvas)
    return Canvases(ids, chunks, len(images))


def crop_resize_flip(canvases: Canvases, top: np.ndarray, left: np.ndarray, height: np.ndarray,
                     width: np.ndarray, flip: np.ndarray, size: int) -> torch.Tensor:
    """Crop, resize (PIL bilinear) and flip ``V`` views of each of ``N`` images in batched matmuls.

    Box arrays are [V, N] (view-major) in source pixels.  Returns [V, N, 3, size, size] uint8.  The
    weights are 0 outside each crop box, so canvas padding never leaks in.  Per chunk of ``k`` images:
    ``T = canvas[k, 3 Hc, Wc] . R_h^T[k, Wc, V S]`` (all views at once), then ``R_v[k V, S, Hc] . T``.
    """
    n = canvases.num_images
    v = int(np.asarray(top).shape[0])
    dev = canvases.device
    box = {k: torch.as_tensor(np.ascontiguousarray(a).astype(np.int64)) for k, a in
           (("top", top), ("left", left), ("height", height), ("width", width), ("flip", flip))}
    out = torch.empty((v, n, 3, size, size), dtype=torch.uint8, device=dev)
    for ids, canvas in zip(canvases.ids, canvases.chunks):
        k, _, hc, wc = canvas.shape
        sel = torch.as_tensor(ids)

        def rows(name: str) -> torch.Tensor:  # [k * V] in image-major order
            return box[name][:, sel].t().reshape(-1).to(dev, non_blocking=True)

        rh = resample_matrix(rows("left"), rows("width"), wc, size, rows("flip").bool())
        rv = resample_matrix(rows("top"), rows("height"), hc, size)
        t = torch.bmm(canvas.view(k, 3 * hc, wc), rh.to(canvas.dtype).view(k, v * size, wc).transpose(1, 2))
        t = t.view(k, 3, hc, v, size).permute(0, 3, 2, 1, 4).reshape(k * v, hc, 3 * size)
        o = torch.bmm(rv.to(canvas.dtype).view(k * v, size, hc), t)              # [k V, S, 3 S]
        o = o.view(k, v, size, 3, size).permute(1, 0, 3, 2, 4)                    # [V, k, 3, S, S]
        o = o.float().round_().clamp_(0, 255).to(torch.uint8)
        if k == n:
            out.copy_(o)
        else:
            out[:, sel.to(dev, non_blocking=True)] = o
    return out


# -- parameters ---------------------------------------------------------------------------------------
def group_params(spec: MultiCropSpec, per_view: Sequence[BatchViewParams]) -> list[BatchViewParams]:
    """Per crop group, the parameters of its ``num_crops[g] * n`` views in (view, sample) order."""
    out = []
    first = 0
    for count in spec.num_crops:
        out.append(concat_params(per_view[first:first + count]))
        first += count
    return out


def view_params(spec: MultiCropSpec, groups: Sequence[BatchViewParams]) -> list[BatchViewParams]:
    """Inverse of :func:`group_params`: one entry per view."""
    return [p for g, count in zip(groups, spec.num_crops) for p in split_params(g, count)]


# -- the loader ---------------------------------------------------------------------------------------
@dataclass
class DecodedBatch:
    """Decoded images of a batch ([3, H, W] uint8 on the loader's device) and their bookkeeping."""

    images: list[torch.Tensor]
    sources: np.ndarray       # the index actually decoded for each requested sample
    ok: np.ndarray            # False where a replacement was used
    bad_paths: list[str]
    labels: np.ndarray | None = None   # of the decoded samples
    indices: np.ndarray | None = None  # the requested indices kept (all unless some were skipped)
    num_bad: int = 0                   # requested samples that were replaced or skipped


class TorchLoader(MultiCropLoader):
    """Batched TorchCodec decode + torch augmentation on ``device`` (CUDA: nvJPEG, side stream).

    ``num_workers``: file-reading threads (0: ``min(8, cpu_count)``).  ``prefetch``: batches produced
    ahead.  Augmentation parameters are those of every backend (:mod:`pipelines.params`): identical
    crops and colour parameters to ``pil`` for the same seed.
    """

    #: ``build_loader`` hands over the path itself: prepared TFRecord / webdataset folders are read too.
    accepts_path = True

    def __init__(self, index: Any, spec: MultiCropSpec, batch_size: int, device: Any = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = True, prefetch: int = TorchOptions.prefetch,
                 decoder: str = TorchOptions.decoder, bad_samples: str = TorchOptions.bad_samples) -> None:
        self.bad = BadSamples(bad_samples)
        self.source = open_source(index, formats=FORMATS)
        # the base class needs only len(index) and index.classes, which every source has
        super().__init__(self.source, spec, batch_size, device, rank, world_size, seed, drop_last)  # type: ignore
        if num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {num_workers}")
        TorchOptions(prefetch=prefetch, decoder=decoder, bad_samples=bad_samples)  # the values' checks
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"loader device {self.device} requested but CUDA is not available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise ConfigError(f"torch loader backend runs on cpu or cuda, not {self.device}")
        self.prefetch = int(prefetch)
        self.decoder = resolve_decoder(decoder)  # auto -> torchcodec when installed, else torchvision
        self.read_threads = num_workers or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="swav-read")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # nvJPEG writes the decoded images from its own stream, which waits for nothing of ours: their
        # memory comes from a stream used for nothing else, and record_stream keeps a block there
        # until the augmentation has read it (no host synchronisation of the loader's stream).
        self._decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._keepalive: list[Any] = []

    # -- stages (also used by benchmarks/bench_loader.py) ---------------------------------------------
    def read(self, indices: Sequence[int]) -> list[tuple[bytearray, int] | BaseException]:
        """Stage 1: each sample's encoded bytes and label (or the exception reading raised)."""
        def one(i: int) -> tuple[bytearray, int] | BaseException:
            try:
                buf, label = self.source.read(i)
            except (OSError, BadImage) as e:
                return e
            # a writable buffer: torch.frombuffer then neither copies nor warns
            return (buf if isinstance(buf, bytearray) else bytearray(buf)), label
        return list(self._pool.map(one, [int(i) for i in indices]))

    def decode(self, indices: Sequence[int], datas: list[tuple[bytearray, int] | BaseException]
               ) -> DecodedBatch:
        """Stage 2: decode on the loader's device; unreadable samples go through the loader's
        :class:`~pipelines.badsamples.BadSamples` policy (replaced by the next readable one, or skipped)."""
        images, errors = decode_images([d if isinstance(d, BaseException) else d[0] for d in datas],
                                       self.device, self.decoder)
        n = len(self.source)
        sources = np.array([int(i) for i in indices], dtype=np.int64)
        labels = np.array([-1 if isinstance(d, BaseException) else d[1] for d in datas], dtype=np.int64)
        ok = np.ones(len(sources), dtype=bool)
        keep = np.ones(len(sources), dtype=bool)
        bad_paths: list[str] = []

        def load_one(j: int) -> tuple[torch.Tensor, int]:
            (d,) = self.read([j])
            if isinstance(d, BaseException):
                raise d
            (img,), (err,) = decode_images([d[0]], self.device, self.decoder)
            if err is not None:
                raise BadImage(err)
            return img, d[1]  # type: ignore[return-value]

        for k in np.nonzero([e is not None for e in errors])[0].tolist():
            ok[k] = False
            j, got, bad = self.bad.resolve(int(sources[k]), n, load_one, self.source.name, failed=errors[k])
            bad_paths.extend(bad)
            if got is None:
                keep[k] = False
                continue
            images[k], labels[k] = got
            sources[k] = j
        if not keep.all():
            if not keep.any():
                raise DataError(f"every sample of a batch of {len(keep)} is unreadable; is the dataset corrupt?")
            images = [im for im, kp in zip(images, keep) if kp]
        requested = np.array([int(i) for i in indices], dtype=np.int64)[keep]
        return DecodedBatch(images, sources[keep], ok[keep], bad_paths,  # type: ignore[arg-type]
                            labels[keep], requested, int((~ok).sum()))

    def params(self, epoch: int, batch_no: int, decoded: DecodedBatch) -> list[BatchViewParams]:
        """Stage 3: per crop group, the parameters of its views in (view, sample) order.

        Each decoded sample's own parameters (:func:`~pipelines.params.sample_params_for_indices` of its
        index); ``batch_no`` does not enter them.
        """
        widths = np.array([im.shape[2] for im in decoded.images], dtype=np.int64)
        heights = np.array([im.shape[1] for im in decoded.images], dtype=np.int64)
        per_view = sample_params_for_indices(self.spec, self.seed, epoch, decoded.sources, widths, heights)
        return group_params(self.spec, per_view)

    def augment(self, images: Sequence[torch.Tensor], params: list[BatchViewParams]) -> list[torch.Tensor]:
        """Stages 4-5: crop + resize + flip, then colour / blur / normalise: one tensor per view."""
        n = len(images)
        canvases = make_canvases(images)
        views: list[torch.Tensor] = []
        for (size, count), p in zip(self.spec.resolution_groups, params):
            crops = crop_resize_flip(canvases, p.top.reshape(count, n), p.left.reshape(count, n),
                                     p.height.reshape(count, n), p.width.reshape(count, n),
                                     p.flip.reshape(count, n), size)
            colour = colour_params_from_batch(p, "cpu")  # host params: no device sync for the blur split
            out = augment_views(crops.view(count * n, 3, size, size), colour, self.spec)
            views.extend(out.split(n, dim=0))
        return views

    def produce(self, epoch: int, batch_no: int, indices: np.ndarray) -> MultiCropBatch:
        """One whole batch (on the current stream)."""
        datas = self.read(indices)
        decoded = self._decode_on_own_stream(indices, datas)
        # keep the encoded bytes until the next batch (torchvision's nvJPEG decode has finished reading
        # them when it returns; this is only a guard against a decoder that does not)
        self._keepalive = datas
        params = self.params(epoch, batch_no, decoded)
        views = self.augment(decoded.images, params)
        return MultiCropBatch(
            views=views, labels=torch.from_numpy(decoded.labels),  # type: ignore[arg-type]
            indices=torch.from_numpy(decoded.indices),  # type: ignore[arg-type]
            num_bad=decoded.num_bad, bad_paths=decoded.bad_paths,
            params=view_params(self.spec, params) if self.record_params else None)

    def _decode_on_own_stream(self, indices: Sequence[int], datas: list[bytearray | BaseException]
                              ) -> DecodedBatch:
        """Stage 2 with the images allocated on the decode stream and handed to the current one."""
        if self._decode_stream is None or torch.cuda.current_stream(self.device) == self._decode_stream:
            return self.decode(indices, datas)
        work = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            decoded = self.decode(indices, datas)
        work.wait_stream(self._decode_stream)
        for img in decoded.images:
            img.record_stream(work)  # the block returns to the decode stream once `work` is done with it
        return decoded

    # -- the pipeline ---------------------------------------------------------------------------------
    def _iterate(self, epoch: int, batches: list[np.ndarray]) -> Iterator[MultiCropBatch]:
        first = self.start_batch

        def produced() -> Iterator[tuple[MultiCropBatch, Any]]:  # runs in the prefetch thread
            for k, idx in enumerate(batches):
                if self._stream is None:
                    yield self.produce(epoch, first + k, idx), None
                    continue
                with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                    batch = self.produce(epoch, first + k, idx)
                    ready = torch.cuda.Event()
                    ready.record(self._stream)
                yield batch, ready

        with Prefetcher(produced(), depth=self.prefetch, name="swav-torch-loader") as batches_ahead:
            for batch, ready in batches_ahead:
                if ready is not None:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(ready)
                    for v in batch.views:
                        v.record_stream(consumer)
                yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.source.close()


register_backend("torch", TorchLoader, options=TorchOptions)
