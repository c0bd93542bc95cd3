"""The ``dali`` loader backend: NVIDIA DALI decodes each image once and cuts every view from it.

One batch of ``B`` samples and ``V`` views goes through three stages:

1. host, in a feeder thread: read the encoded bytes in the base class's order, check each file's
   header and take the image size from it, draw the crop boxes, flips and colour parameters;
2. DALI: ``decoders.image`` (``mixed``: nvJPEG with the hardware JPEG decoder on the GPU; ``cpu``
   otherwise) decodes each image once, then one ``resize`` per view, with the view's region of
   interest, crops, resizes and flips it (uint8, HWC);
3. torch: the views of one crop size go through :func:`pipelines.gpu_aug.augment_views` in one call
   (colour jitter + grayscale as a per-sample 3x3 matrix and offset, blur, solarize, normalise;
   the spec's dtype and memory format).  Outputs stay on the loader's device.

*Order and randomness.*  Every format goes through ``fn.external_source`` fed in the base class's
order (:meth:`MultiCropLoader.batch_indices`): the same ``(seed, epoch)`` permutation, rank striding,
``set_epoch(epoch, start_batch)`` resume and bad-sample accounting as the ``pil`` backend, for an
ImageFolder, TFRecord shards and webdataset tars alike.  The sample bytes are read by random access
through :func:`pipelines.formats.open_source` (files; TFRecord records and tar members located
through their DALI index files), so DALI's own
readers, whose shuffle is a bounded buffer and whose shards are contiguous ranges that cannot resume
mid-epoch, are not needed.  Crop boxes, flips and colour parameters are drawn on the host by
:func:`pipelines.params.sample_params_for_indices` (torchvision ``RandomResizedCrop`` semantics: area
fraction ``s ~ U[min, max]``, aspect ratio ``log r ~ U[log r0, log r1]``, 10 tries, then a centre
crop), a function of ``(seed, epoch, sample index, view)`` shared by every backend, using the image
size read from the file header, and fed to DALI as per-sample inputs (DALI's own generator is not
used).  A flip is a reversed ROI in
``fn.resize`` (``roi_start.x > roi_end.x``), so crop, resize and flip are one DALI operator per view.

*Bad files.*  DALI fails a whole batch (and its pipeline) on one undecodable file, so every file is
checked on the host first by :func:`pipelines.formats.probe.image_size` (known format, dimensions in
the header, JPEG end-of-image / PNG ``IEND`` present, under ``MAX_PIXELS``); a failing file goes
through the loader's :class:`~pipelines.badsamples.BadSamples` policy (replaced by the next good
sample, or skipped), logged once and counted (``num_bad``, ``bad_paths``) as in every backend.  A
file that passes the check but still fails in DALI is found by decoding the in-flight batches one
image at a time, marked bad, and the pipeline is rebuilt and re-fed from the failed batch.

``nvidia.dali`` is imported lazily: ``import pipelines`` works without it; building a ``dali``
loader without it raises :class:`~pipelines.errors.ConfigError` naming the ``dali`` extra.  The
host-side preparation runs in a :class:`pipelines.prefetch.Prefetcher` thread.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pipelines.errors import ConfigError, DataError, SwavFastError

from . import gpu_aug
from .badsamples import BadSamples
from .exif import jpeg_orientation, oriented_size
from .formats.probe import image_size
from .formats.sources import open_source
from .loader import MultiCropBatch, MultiCropLoader, register_backend
from .options import DaliOptions
from .params import BatchViewParams, concat_params, sample_params_for_indices
from .prefetch import Prefetcher
from .spec import MultiCropSpec

log = logging.getLogger("pipelines")

#: Default share of JPEG decoding given to the hardware decoder (A100/H100) in ``mixed`` mode.
DEFAULT_HW_DECODER_LOAD = DaliOptions.hw_decoder_load
#: How many times one pass may rebuild the pipeline after a decode failure before giving up (each
#: rebuild follows at least one newly found bad file; the host-side check catches the usual ones).
MAX_RECOVERIES = 256
#: What this backend reads (:mod:`pipelines.formats`); the README's backend table lists it.
FORMATS = ("folder", "tfrecord", "wds")


# -- optional dependency -------------------------------------------------------------------------
def import_dali() -> Any:
    """``nvidia.dali`` (imported on first use); ConfigError with the install hint when it is missing."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "data.loader=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130==2.4.0); "
            f"import failed: {e}") from e
    return dali


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        import_dali()
    except ConfigError:
        return False
    return True


# -- host-side batch preparation -----------------------------------------------------------------
@dataclass
class _Planned:
    """A batch as planned by the base class: its epoch, number within the epoch and sample indices."""

    epoch: int
    number: int
    indices: np.ndarray


@dataclass
class _Issued:
    """A batch handed to DALI: what the consumer needs once its outputs come back."""

    plan: _Planned
    serial: int
    sources: np.ndarray  # the sample actually used for each requested index (replacement or itself)
    labels: np.ndarray
    ok: np.ndarray
    bad_paths: list[str]
    params: list[BatchViewParams]
    rois: list[np.ndarray] = field(repr=False, default_factory=list)  # per sample [V, 4], see crop_rois
    encoded: list[np.ndarray] = field(repr=False, default_factory=list)
    #: the requested indices of the samples in the batch (all of ``plan.indices`` unless some were skipped)
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def crop_rois(p: BatchViewParams) -> np.ndarray:
    """``[B, 4]`` float32 ``(y0, x0, y1, x1)`` in source pixels; ``x0 > x1`` (reversed) for a flip."""
    x0 = p.left.astype(np.float32)
    x1 = (p.left + p.width).astype(np.float32)
    y0 = p.top.astype(np.float32)
    y1 = (p.top + p.height).astype(np.float32)
    return np.stack([y0, np.where(p.flip, x1, x0), y1, np.where(p.flip, x0, x1)], axis=1)


# -- the DALI graph ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeOptions:
    """DALI pipeline settings (device, threads, queue depth, decoder tuning)."""

    device_id: int | None
    num_threads: int
    prefetch: int
    hw_decoder_load: float
    sizes: tuple[int, ...]

    @property
    def decoder_device(self) -> str:
        return "cpu" if self.device_id is None else "mixed"


def build_pipeline(opts: DecodeOptions, batch_size: int, source: Callable[[], Any]) -> Any:
    """Decode once, then one ``resize`` per view with its ROI (crop + flip) to ``S_v x S_v``, uint8 HWC.

    Outputs: ``serial`` (int64 [1] per sample, to pair outputs with the host's batch record), then
    the views in order.
    """
    dali = import_dali()
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=opts.num_threads, device_id=opts.device_id,
                         prefetch_queue_depth=opts.prefetch, exec_async=True, exec_pipelined=True)
    with pipe:
        encoded, rois, serial = fn.external_source(
            source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT, types.INT64],
            ndim=[1, 2, 1])
        # EXIF orientation applied, as by every loader (the ROIs are drawn on the turned size)
        decode_args: dict[str, Any] = {"device": opts.decoder_device, "output_type": types.RGB,
                                       "adjust_orientation": True}
        if opts.device_id is not None:
            decode_args["hw_decoder_load"] = opts.hw_decoder_load
        image = fn.decoders.image(encoded, **decode_args)
        views = [fn.resize(image, size=[s, s], roi_start=rois[v, 0:2], roi_end=rois[v, 2:4],
                           interp_type=types.INTERP_LINEAR, antialias=True)
                 for v, s in enumerate(opts.sizes)]
        pipe.set_outputs(serial, *views)
    pipe.build()
    return pipe


class _DecodeChecker:
    """Decodes one image at a time with the loader's decoder, to find the file a failed batch tripped on."""

    def __init__(self, opts: DecodeOptions) -> None:
        self.opts = opts
        self._pipe: Any = None

    def _build(self) -> Any:
        dali = import_dali()
        fn, types = dali.fn, dali.types
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=self.opts.device_id,
                             prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.image(encoded, device=self.opts.decoder_device,
                                               output_type=types.RGB, adjust_orientation=True))
        pipe.build()
        return pipe

    def decodes(self, buf: np.ndarray) -> bool:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.run(encoded=[buf])
            return True
        except Exception:  # noqa: BLE001 - any decoder error: this file is bad
            self._pipe = None  # a failed pipeline is not reusable
            return False


# -- the loader ----------------------------------------------------------------------------------
class DALILoader(MultiCropLoader):
    """Multi-crop loader on NVIDIA DALI; ``device="cuda"`` decodes with nvJPEG (+ HW decoder), CPU otherwise.

    ``source``: an ImageFolder (path or :class:`ImageFolderIndex`) or a prepared split folder
    (``manifest.json`` with ``format`` ``tfrecord`` or ``wds``).  ``threads`` is DALI's CPU thread
    count (0: ``num_workers``, at least 1); ``prefetch`` its queue depth; ``hw_decoder_load`` the share
    of JPEGs sent to the hardware JPEG decoder (GPU mode only).  Outputs stay on ``device``.
    """

    #: ``build_loader`` may hand over the source path unscanned (prepared folders are not ImageFolders).
    accepts_path = True

    def __init__(self, source: Any, spec: MultiCropSpec, batch_size: int, device: Any = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 4,
                 drop_last: bool = True, prefetch: int = DaliOptions.prefetch,
                 hw_decoder_load: float = DaliOptions.hw_decoder_load, threads: int = DaliOptions.threads,
                 bad_samples: str = DaliOptions.bad_samples) -> None:
        import_dali()
        self.bad = BadSamples(bad_samples, remember=True)
        self.source = open_source(source, formats=FORMATS)
        # the base class needs only len(index) and index.classes, which every source has
        super().__init__(self.source, spec, batch_size, device, rank, world_size, seed,  # type: ignore
                         drop_last)
        if num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {num_workers}")
        DaliOptions(hw_decoder_load=hw_decoder_load, threads=threads, prefetch=prefetch,
                    bad_samples=bad_samples)  # the values' checks
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"dali loader: device {self.device} requested but CUDA is not available")
            device_id: int | None = (self.device.index if self.device.index is not None
                                     else torch.cuda.current_device())
            self.device = torch.device("cuda", device_id)
        elif self.device.type == "cpu":
            device_id = None
        else:
            raise ConfigError(f"dali loader: device must be cpu or cuda, got {self.device}")
        self.opts = DecodeOptions(device_id=device_id, num_threads=max(1, int(threads or num_workers)),
                                  prefetch=int(prefetch), hw_decoder_load=float(hw_decoder_load),
                                  sizes=tuple(spec.view_sizes))
        self._pipe: Any = None
        self._checker = _DecodeChecker(self.opts)
        self._plans: list[_Planned] = []  # this pass's batches
        self._feeder: Prefetcher[_Issued] | None = None
        self._issued: deque[_Issued] = deque()  # handed to DALI, outputs not yet returned
        self._serial = 0
        self._active = False
        self._groups = _view_groups(spec)
        #: view v -> (its group, its position in the group)
        self._view_slots = [next((g, m.index(v)) for g, m in enumerate(self._groups) if v in m)
                            for v in range(spec.num_views)]

    # -- host side ------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """DALI's ``external_source`` callback: the next prepared batch (StopIteration at the end)."""
        if self._feeder is None:
            raise StopIteration
        issued = self._feeder.get()
        self._issued.append(issued)
        serial = np.array([issued.serial], dtype=np.int64)
        return issued.encoded, issued.rois, [serial] * len(issued.encoded)

    def _prepare(self, plan: _Planned) -> _Issued:
        """Read, check (bad files per the :class:`~pipelines.badsamples.BadSamples` policy) and draw the
        augmentation parameters of one batch."""
        n = len(self.source)

        def load(j: int) -> tuple[Any, int, tuple[int, int]]:
            buf, label = self.source.read(j)
            return buf, label, oriented_size(*image_size(buf), jpeg_orientation(buf))  # as decoded

        encoded: list[np.ndarray] = []
        kept: list[int] = []
        sizes, sources, labels, ok = [], [], [], []
        bad_paths: list[str] = []
        for b, i in enumerate(plan.indices):
            j, got, bad = self.bad.resolve(int(i), n, load, self.source.name)
            bad_paths.extend(bad)
            if got is None:  # skipped
                continue
            buf, label, size = got
            encoded.append(np.frombuffer(buf, dtype=np.uint8))
            kept.append(b)
            sizes.append(size)
            sources.append(j)
            labels.append(label)
            ok.append(not bad)
        if not encoded:
            raise DataError(f"every sample of batch {plan.number} (epoch {plan.epoch}) is unreadable; "
                            "is the dataset corrupt?")
        wh = np.array(sizes, dtype=np.int64).reshape(-1, 2)
        params = sample_params_for_indices(self.spec, self.seed, plan.epoch, np.array(sources, dtype=np.int64),
                                           wh[:, 0], wh[:, 1])
        rois = list(np.stack([crop_rois(p) for p in params], axis=1))  # B x [V, 4]
        self._serial += 1
        return _Issued(plan, self._serial, np.array(sources, dtype=np.int64), np.array(labels, dtype=np.int64),
                       np.array(ok, dtype=bool), bad_paths, params, rois, encoded,
                       indices=np.asarray(plan.indices, dtype=np.int64)[kept])

    # -- iteration -----------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = build_pipeline(self.opts, self.batch_size, self._next_batch)
        return self._pipe

    def _start_feeder(self, position: int) -> None:
        if self._feeder is not None:
            self._feeder.close()
        self._feeder = Prefetcher((self._prepare(p) for p in self._plans[position:]),
                                  depth=self.opts.prefetch + 2, name="dali-loader-feeder")

    def _stop_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None

    def _finish_pass(self) -> None:
        """End a pass left unfinished (consumer stopped early): discard the batches still in flight."""
        if not self._active:
            return
        self._stop_feeder()  # the callback now ends the pass
        if self._pipe is not None:
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                self._pipe.reset()
            except Exception:  # noqa: BLE001 - a failed pipeline is simply rebuilt
                self._pipe = None
        self._issued.clear()
        self._active = False

    def _iterate(self, epoch: int, batches: list[np.ndarray]) -> Iterator[MultiCropBatch]:
        for groups, issued in self._iterate_groups(epoch, batches):
            yield self._augment(groups, issued)

    def iterate_crops(self, epoch: int | None = None, start_batch: int | None = None
                      ) -> Iterator[tuple[list[torch.Tensor], _Issued]]:
        """Per view, the uint8 crops ``[B, 3, S, S]`` before colour, with their batch record (tests)."""
        epoch = self.epoch if epoch is None else epoch
        for groups, issued in self._iterate_groups(epoch, self.batch_indices(epoch, start_batch)):
            b = len(issued.labels)
            yield [groups[g][k * b:(k + 1) * b] for g, k in self._view_slots], issued

    def iterate_with_record(self, epoch: int | None = None, start_batch: int | None = None
                            ) -> Iterator[tuple[MultiCropBatch, _Issued]]:
        """The augmented batches with their batch record (augmentation parameters, sources), for tests."""
        epoch = self.epoch if epoch is None else epoch
        for groups, issued in self._iterate_groups(epoch, self.batch_indices(epoch, start_batch)):
            yield self._augment(groups, issued), issued

    def _iterate_groups(self, epoch: int, batches: list[np.ndarray]
                        ) -> Iterator[tuple[list[torch.Tensor], _Issued]]:
        """Run the pipeline over ``batches``: per crop size, its views' uint8 crops ``[n_g B, 3, S, S]``."""
        self._finish_pass()
        start = len(self) - len(batches)
        self._plans = [_Planned(epoch, start + k, b) for k, b in enumerate(batches)]
        self._issued.clear()
        self._active = True
        self._start_feeder(0)
        recoveries = 0
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            pipe = self._pipeline()
            try:
                # on CUDA the outputs are ordered on torch's stream: no host synchronisation
                outputs = pipe.run(stream) if stream is not None else pipe.run()
            except StopIteration:
                pipe.reset()
                self._stop_feeder()
                self._active = False
                return
            except SwavFastError:  # from the feeder (e.g. a run of unreadable files): not a decode error
                self._pipe = None
                self._stop_feeder()
                self._active = False
                raise
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses for decode errors
                recoveries += 1
                if recoveries > MAX_RECOVERIES:
                    raise DataError(f"DALI pipeline failed {recoveries} times in one pass; "
                                    f"last error: {e}") from e
                self._recover(e)
                continue
            issued = self._issued.popleft()
            serial = int(outputs[0].as_array()[0, 0])
            if serial != issued.serial:
                raise RuntimeError(f"dali loader: output batch {serial} does not match the expected "
                                   f"{issued.serial}")
            groups = self._gather(outputs[1:], len(issued.labels), stream)
            issued.encoded = []
            yield groups, issued

    def _recover(self, err: BaseException) -> None:
        """Find the undecodable files among the in-flight batches, then rebuild and re-feed them."""
        suspects = list(self._issued)
        found = 0
        for issued in suspects:
            for j, buf in zip(issued.sources, issued.encoded):
                if not self._checker.decodes(buf):
                    self.bad.mark(self.source.name(int(j)), "DALI could not decode it", int(j))
                    found += 1
        self._pipe = None
        if not found:
            self._stop_feeder()
            self._active = False
            raise DataError(f"DALI pipeline failed and no image in the batch could be blamed: {err}") from err
        self._issued.clear()
        # re-prepare from the (oldest) failed batch on
        self._start_feeder(suspects[0].plan.number - self._plans[0].number)

    def _gather(self, views: Sequence[Any], b: int, stream: Any) -> list[torch.Tensor]:
        """Copy the views' DALI outputs (``[B, S, S, 3]`` uint8 each) into one torch buffer per crop size.

        Returns ``[n_g B, 3, S, S]`` per group (a permuted view of the HWC buffer: channels-last strides,
        which the augmentation keeps, so nothing is converted to NCHW and back). On CUDA the copies are
        ordered on ``stream`` (torch's current stream), whose handle DALI must get as a
        ``ctypes.c_void_p``: a plain int is read as stream 0.
        """
        out = []
        handle = ctypes.c_void_p(stream.cuda_stream) if stream is not None else None
        for members in self._groups:
            s = self.spec.view_sizes[members[0]]
            buf = torch.empty((len(members) * b, s, s, 3), dtype=torch.uint8, device=self.device)
            for k, v in enumerate(members):
                copy_dali_output(views[v], buf[k * b:(k + 1) * b], handle)
            out.append(buf.permute(0, 3, 1, 2))
        return out

    def _augment(self, groups: list[torch.Tensor], issued: _Issued) -> MultiCropBatch:
        """Colour jitter, grayscale, blur, solarize and normalisation: one batched call per crop size."""
        views: list[torch.Tensor] = [torch.empty(0)] * self.spec.num_views
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        b = len(issued.labels)
        for crops, members in zip(groups, self._groups):
            # host-side params: augment_views splits blurred / plain crops without a device sync
            params = gpu_aug.colour_params_from_batch(
                concat_params([issued.params[v] for v in members]), "cpu")
            out = gpu_aug.augment_views(crops, params, self.spec)
            for k, v in enumerate(members):
                views[v] = out[k * b:(k + 1) * b].contiguous(memory_format=fmt)
        non_blocking = self.device.type == "cuda"
        return MultiCropBatch(
            views=views,
            labels=torch.from_numpy(issued.labels).to(self.device, non_blocking=non_blocking),
            indices=torch.from_numpy(issued.indices).to(self.device, non_blocking=non_blocking),
            num_bad=int((~issued.ok).sum()) + len(issued.plan.indices) - len(issued.labels),  # + skipped
            bad_paths=list(issued.bad_paths),
            params=list(issued.params) if self.record_params else None)

    def close(self) -> None:
        self._stop_feeder()
        self._issued.clear()
        self._pipe = None
        self._checker = _DecodeChecker(self.opts)
        self._active = False
        self.source.close()


def copy_dali_output(tl: Any, dst: torch.Tensor, stream: ctypes.c_void_p | None = None) -> None:
    """Copy a DALI TensorList of ``B`` samples ``[S, S, 3]`` into the contiguous ``dst`` ``[B, S, S, 3]``.

    A dense output goes in one ``copy_to_external``; a non-contiguous one (samples in separate
    allocations) sample by sample. ``stream``: on the GPU, the ``ctypes.c_void_p`` handle of the stream
    the copies are ordered on (asynchronous: no host synchronisation); None on the CPU.
    """
    if not dst.is_contiguous():
        raise ValueError("copy_dali_output needs a contiguous destination")
    expected = list(dst.shape[1:])
    shapes = [list(sh) for sh in tl.shape()]
    if len(shapes) != dst.shape[0] or any(sh != expected for sh in shapes):
        raise RuntimeError(f"dali loader: a view came out {shapes[:3]}{'...' if len(shapes) > 3 else ''} "
                           f"({len(shapes)} samples), expected {dst.shape[0]} x {expected}")

    def copy(src: Any, ptr: int) -> None:
        if stream is not None:
            src.copy_to_external(ctypes.c_void_p(ptr), stream, non_blocking=True)
        else:
            src.copy_to_external(ctypes.c_void_p(ptr))

    if tl.is_dense_tensor():
        copy(tl.as_tensor(), dst.data_ptr())
        return
    step = dst[0].numel() * dst.element_size()
    for i in range(len(shapes)):
        copy(tl[i], dst.data_ptr() + i * step)


def _view_groups(spec: MultiCropSpec) -> list[list[int]]:
    """View indices grouped by output size (views of one size are augmented in one call)."""
    groups: dict[int, list[int]] = {}
    for v, s in enumerate(spec.view_sizes):
        groups.setdefault(s, []).append(v)
    return list(groups.values())


register_backend("dali", DALILoader, options=DaliOptions)
