"""The loader API used by training and benchmarks: sharding, epochs, exact resume, bad-file accounting."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.errors import ConfigError, DataError, SwavFastError
from pipelines.registry import Registry

from .folder import ImageFolderIndex, scan_image_folder
from .options import BackendOptions, PilOptions
from .params import BatchViewParams, stack_rows
from .pil import FORMATS as PIL_FORMATS
from .pil import PILMultiCropDataset, Sample
from .spec import MultiCropSpec

#: Stream tag of the epoch shuffle (the augmentation parameters come from pipelines.params, another generator).
_SHUFFLE_TAG = 0x5357_4156


@dataclass
class MultiCropBatch:
    """One batch: ``views[v]`` is [B, 3, S_v, S_v] (globals first) in the spec's dtype / memory format.

    ``params[v]``: the augmentation parameters of view ``v`` (host arrays of length B), when the loader's
    ``record_params`` is set (tests compare backends with them); None otherwise.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    num_bad: int
    bad_paths: list[str] = field(default_factory=list)
    params: list[BatchViewParams] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self) -> "MultiCropBatch":
        """Used by DataLoader(pin_memory=True)."""
        return MultiCropBatch([v.pin_memory() for v in self.views], self.labels.pin_memory(),
                              self.indices.pin_memory(), self.num_bad, self.bad_paths, self.params)

    def to(self, device: torch.device | str, non_blocking: bool = False,
           memory_format: torch.memory_format = torch.contiguous_format) -> "MultiCropBatch":
        dev = torch.device(device)
        views = [v.to(dev, non_blocking=non_blocking).contiguous(memory_format=memory_format) for v in self.views]
        return MultiCropBatch(views, self.labels.to(dev, non_blocking=non_blocking),
                              self.indices.to(dev, non_blocking=non_blocking), self.num_bad, self.bad_paths,
                              self.params)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of ``epoch`` (same on every rank)."""
    return np.random.default_rng([int(seed), int(epoch), 0, _SHUFFLE_TAG]).permutation(n)


class MultiCropLoader:
    """Base loader: deterministic sharded order per epoch, ``start_batch`` resume, bad-sample counts.

    Order: a permutation from ``(seed, epoch)``; with ``drop_last`` it is truncated to a multiple of
    ``world_size`` (ranks strictly disjoint), otherwise padded by wrapping (ranks jointly cover every
    sample).  Rank ``r`` takes every ``world_size``-th sample from position ``r``.  Backends override
    :meth:`_iterate`.  Augmentation parameters follow :mod:`pipelines.params` (a function of seed, epoch,
    sample index and view); set ``record_params`` to get them in every batch (``MultiCropBatch.params``).
    """

    #: Put each batch's augmentation parameters in ``MultiCropBatch.params`` (set before a pass).
    record_params: bool = False

    def __init__(self, index: ImageFolderIndex, spec: MultiCropSpec, batch_size: int, device: Any = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {seed}")
        self.index = index
        self.spec = spec
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0
        self.num_bad = 0
        self.bad_paths: list[str] = []
        n = len(index)
        self.num_samples = n // self.world_size if self.drop_last else -(-n // self.world_size)
        if self.drop_last and self.num_samples < self.batch_size:
            raise ConfigError(f"batch_size {batch_size} x world_size {world_size} is larger than the dataset "
                              f"({n} images) with drop_last; no full batch per epoch")

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def dataset_size(self) -> int:
        return len(self.index)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; skip the first ``start_batch`` batches of this rank (exact resume).

        Holds for every following pass until the next call: call it once per epoch, like DistributedSampler.
        """
        if epoch < 0:
            raise ConfigError(f"epoch: must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch: must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's sample indices for ``epoch`` (all of them, before batching)."""
        epoch = self.epoch if epoch is None else epoch
        perm = epoch_permutation(len(self.index), self.seed, epoch)
        total = self.num_samples * self.world_size
        if total > len(perm):
            perm = np.concatenate([perm, np.resize(perm, total - len(perm))])
        return perm[:total][self.rank::self.world_size]

    def batch_indices(self, epoch: int | None = None, start_batch: int | None = None) -> list[np.ndarray]:
        """This rank's batches (index arrays) for ``epoch``, from ``start_batch`` on."""
        idx = self.epoch_indices(epoch)
        start = self.start_batch if start_batch is None else start_batch
        return [idx[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, len(self))]

    def __iter__(self) -> Iterator[MultiCropBatch]:
        non_blocking = self.device.type == "cuda"
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        for batch in self._iterate(self.epoch, self.batch_indices()):
            batch = batch.to(self.device, non_blocking=non_blocking, memory_format=fmt)
            self.num_bad += batch.num_bad
            self.bad_paths.extend(batch.bad_paths)
            yield batch

    def _iterate(self, epoch: int, batches: list[np.ndarray]) -> Iterator[MultiCropBatch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (if any)."""


# -- PIL backend ---------------------------------------------------------------------------------
@dataclass
class _WorkerFailure:
    """A project error (e.g. a run of unreadable images) met in a DataLoader worker, carried to the main
    process as data: raised there as itself, in one line, not inside the worker's traceback."""

    error: type
    message: str


def _quiet_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker dies with its parent (Linux ``PR_SET_PDEATHSIG``) instead
    of printing a ``BrokenPipeError`` traceback into the terminal of a killed run."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before the call
            os._exit(0)


class _EpochItems(Dataset):
    """Dataset over ``(epoch, index)`` keys, so persistent workers never need a set_epoch broadcast."""

    def __init__(self, dataset: PILMultiCropDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, bool]) -> Sample | _WorkerFailure:
        epoch, i, record = key
        try:
            s = self.dataset.load(i, epoch)
        except SwavFastError as exc:
            return _WorkerFailure(type(exc), str(exc))
        if not record:
            s.params = []  # not asked for; keep IPC small
        return s

    def __getitems__(self, keys: list[tuple[int, int, bool]]) -> list[Sample | _WorkerFailure]:
        """A whole batch at once (the DataLoader's fetcher calls this when it exists): the samples of
        :meth:`__getitem__`, their parameters drawn in one call."""
        if len({(epoch, record) for epoch, _, record in keys}) != 1:  # PILLoader's batches are uniform
            return [self[k] for k in keys]
        epoch, _, record = keys[0]
        try:
            samples = self.dataset.load_many([i for _, i, _ in keys], epoch)
        except SwavFastError as exc:
            return [_WorkerFailure(type(exc), str(exc))]
        if not record:
            for s in samples:
                s.params = []
        return list(samples)


class _BatchList:
    """A batch sampler whose batches are replaced before every pass."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int, bool]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Collate:
    """Stack samples into a CPU :class:`MultiCropBatch` in the spec's dtype and memory format."""

    def __init__(self, spec: MultiCropSpec) -> None:
        self.dtype = spec.torch_dtype
        self.fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
        self.num_views = spec.num_views

    def __call__(self, samples: Sequence[Sample]) -> MultiCropBatch | _WorkerFailure:
        failed = next((s for s in samples if isinstance(s, _WorkerFailure)), None)
        if failed is not None:
            return failed
        skipped = sum(not s.views for s in samples)
        bad_paths = [p for s in samples for p in s.bad_paths]
        samples = [s for s in samples if s.views]  # the bad-sample policy "skip" left these out
        if not samples:
            return _WorkerFailure(DataError, f"every sample of a batch of {skipped} is unreadable; "
                                  "is the dataset corrupt?")
        views = [torch.stack([s.views[v] for s in samples]).to(self.dtype).contiguous(memory_format=self.fmt)
                 for v in range(self.num_views)]
        return MultiCropBatch(
            views=views,
            labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
            indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
            num_bad=sum(not s.ok for s in samples) + skipped,
            bad_paths=bad_paths,
            params=([stack_rows([s.params[v] for s in samples]) for v in range(self.num_views)]
                    if samples and samples[0].params else None))


class PILLoader(MultiCropLoader):
    """PIL decode + augment in DataLoader worker processes (the official-style reference).

    ``index``: an ImageFolder (path or index) or a prepared TFRecord / webdataset split folder.
    """

    #: ``build_loader`` hands over the path itself: prepared TFRecord / webdataset folders are read too.
    accepts_path = True
    formats = PIL_FORMATS

    def __init__(self, index: Any, spec: MultiCropSpec, batch_size: int, device: Any = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = True, prefetch_factor: int = PilOptions.prefetch_factor,
                 bad_samples: str = PilOptions.bad_samples) -> None:
        if num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {num_workers}")
        PilOptions(prefetch_factor=prefetch_factor, bad_samples=bad_samples)  # the values' checks
        self.dataset = PILMultiCropDataset(index, spec, seed, bad_samples=bad_samples)
        # the base class needs only len(index) and index.classes, which every source has
        super().__init__(self.dataset.source, spec, batch_size, device, rank, world_size, seed,  # type: ignore
                         drop_last)
        self._sampler = _BatchList()
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers else {}
        self._loader = DataLoader(_EpochItems(self.dataset), batch_sampler=self._sampler, num_workers=num_workers,
                                  collate_fn=Collate(spec), pin_memory=self.device.type == "cuda",
                                  # its own generator: starting an epoch must not draw from the global
                                  # RNG, which methods use (negatives) and checkpoints restore
                                  generator=torch.Generator().manual_seed(seed),
                                  worker_init_fn=_quiet_worker if num_workers else None, **extra)

    def _iterate(self, epoch: int, batches: list[np.ndarray]) -> Iterator[MultiCropBatch]:
        record = bool(self.record_params)
        self._sampler.batches = [[(epoch, int(i), record) for i in b] for b in batches]
        for batch in self._loader:
            if isinstance(batch, _WorkerFailure):
                raise batch.error(batch.message)
            yield batch

    def close(self) -> None:
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None
        self.dataset.source.close()


# -- registry ------------------------------------------------------------------------------------
LoaderFactory = Callable[..., MultiCropLoader]


def _import_builtin_backends() -> None:
    """The backend modules register themselves when imported (on first use, not at package import)."""
    from . import dali_backend, ffcv_backend, torch_backend  # noqa: F401


#: name -> factory, with metadata ``options``: the backend's options class (None: it takes none)
BACKENDS: Registry[LoaderFactory] = Registry("loader backend", loader=_import_builtin_backends)


def register_backend(name: str, factory: LoaderFactory, options: type[BackendOptions] | None = None) -> None:
    """Register ``factory(index, spec, batch_size, device=, rank=, world_size=, seed=, num_workers=,
    drop_last=, **options.kwargs())``; ``options``: the backend's options dataclass
    (:mod:`pipelines.options`), whose fields are keywords of the factory (None: it takes none)."""
    BACKENDS.register(name, factory, options=options)


def available_backends() -> list[str]:
    return BACKENDS.names()


def backend_options_class(backend: str) -> type[BackendOptions] | None:
    """The options class ``backend`` registered (None when it takes none)."""
    return BACKENDS.meta(backend)["options"]


def backend_formats(name: str) -> tuple[str, ...]:
    """The stored formats (:data:`pipelines.formats.sources.ALL_FORMATS`) backend ``name`` reads: its
    module's ``FORMATS`` (an ImageFolder only when it declares none)."""
    factory = BACKENDS.get(name)
    module = sys.modules.get(getattr(factory, "__module__", ""), None)
    return tuple(getattr(factory, "formats", None) or getattr(module, "FORMATS", None) or ("folder",))


def backends_reading(fmt: str) -> list[str]:
    """The registered backends that read format ``fmt``."""
    return [name for name in available_backends() if fmt in backend_formats(name)]


register_backend("pil", PILLoader, options=PilOptions)


def resolve_options(backend: str, options: BackendOptions | None = None, **overrides: Any
                    ) -> BackendOptions | None:
    """``backend``'s options object: ``options`` (default: the class's defaults) with keyword
    ``overrides``; :class:`ConfigError` for options of another backend or an unknown keyword."""
    cls = backend_options_class(backend)
    if cls is None:
        if options is not None:
            raise ConfigError(f"loader backend {backend!r} takes no options object, "
                              f"got {type(options).__name__}")
        return None
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise ConfigError(f"loader backend {backend!r} takes {cls.__name__}, got {type(options).__name__}")
    if overrides:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for loader backend {backend!r}; "
                              f"valid: {', '.join(valid)}")
        options = dataclasses.replace(options, **overrides)
    return options


def build_loader(source: str | os.PathLike[str] | ImageFolderIndex, spec: MultiCropSpec, batch_size: int,
                 backend: str = "pil", device: Any = "cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, drop_last: bool = True, options: BackendOptions | None = None,
                 **backend_options: Any) -> MultiCropLoader:
    """A multi-crop loader over a dataset path (or a pre-scanned :class:`ImageFolderIndex`).

    Backends whose factory has ``accepts_path = True`` get the path itself, so that they can also read
    prepared datasets (``swav-fast prepare`` TFRecord / webdataset / beton folders; which backend reads
    which format: :func:`backend_formats`, the README's backend table).
    ``options``: the backend's options object (e.g. :class:`~pipelines.options.DaliOptions`; default:
    its defaults); ``backend_options``: single fields of it by keyword (e.g. ``prefetch=1``).
    """
    factory = BACKENDS.get(backend)
    opts = resolve_options(backend, options, **backend_options)
    kwargs = opts.kwargs() if opts is not None else backend_options
    if isinstance(source, ImageFolderIndex) or getattr(factory, "accepts_path", False):
        index = source
    else:
        index = scan_image_folder(source)
    return factory(index, spec, batch_size, device=device, rank=rank, world_size=world_size,
                   seed=seed, num_workers=num_workers, drop_last=drop_last, **kwargs)
