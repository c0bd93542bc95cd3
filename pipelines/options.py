"""Each loader backend's own settings, as typed dataclasses (no torch import: config parsing uses them).

A backend registers its options class with :func:`pipelines.loader.register_backend`; the config
offers it as ``data.<backend>.*`` (``data.dali.hw_decoder_load``, ``data.torch.prefetch``, ...), and
:func:`pipelines.loader.build_loader` hands the chosen backend its options object.  The defaults
live here and nowhere else: the backends' constructors take theirs from these classes.

Values are checked when an options object is made, one ``key: must be ..., got value`` line per
problem (:class:`~pipelines.errors.ConfigError`); the config prefixes the section
(``data.dali.hw_decoder_load: ...``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipelines.badsamples import POLICIES as BAD_SAMPLE_POLICIES
from pipelines.errors import ConfigError

#: ``data.torch.decoder``: ``auto`` = TorchCodec when installed, else torchvision.io (see pipelines.decode)
DECODERS = ("auto", "torchcodec", "torchvision", "nvimgcodec")


@dataclass
class BackendOptions:
    """Base of the backends' options: the fields are keyword arguments of the backend's factory."""

    def kwargs(self) -> dict[str, Any]:
        """The options as the factory's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}: must be >= {low}, got {value}")


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}: must be one of {', '.join(valid)}, got {value!r}")


@dataclass
class PilOptions(BackendOptions):
    """``pil``: PIL decode + augment in DataLoader worker processes."""

    prefetch_factor: int = 4  # batches each worker process prepares ahead (DataLoader prefetch_factor)
    bad_samples: str = "replace"  # an unreadable sample: replace (by the next readable one) | skip

    def __post_init__(self) -> None:
        _at_least("prefetch_factor", self.prefetch_factor, 1)
        _one_of("bad_samples", self.bad_samples, BAD_SAMPLE_POLICIES)


@dataclass
class TorchOptions(BackendOptions):
    """``torch``: batched decode (nvJPEG on CUDA) and augmentation in torch."""

    prefetch: int = 2  # batches produced ahead of the training step by the loader's thread
    #: JPEG decoder: auto (torchcodec if installed, else torchvision) | torchcodec | torchvision | nvimgcodec
    decoder: str = "auto"
    bad_samples: str = "replace"  # an unreadable sample: replace (by the next readable one) | skip

    def __post_init__(self) -> None:
        _at_least("prefetch", self.prefetch, 1)
        _one_of("decoder", self.decoder, DECODERS)
        _one_of("bad_samples", self.bad_samples, BAD_SAMPLE_POLICIES)


@dataclass
class DaliOptions(BackendOptions):
    """``dali``: one NVIDIA DALI pipeline (nvJPEG + hardware decoder on GPU, CPU mode otherwise)."""

    hw_decoder_load: float = 0.9  # GPU mode: share of JPEGs sent to the hardware JPEG decoder
    threads: int = 0  # DALI CPU threads; 0 = data.workers (at least 1)
    prefetch: int = 2  # DALI prefetch queue depth (batches in flight)
    bad_samples: str = "replace"  # an unreadable sample: replace (by the next readable one) | skip

    def __post_init__(self) -> None:
        _one_of("bad_samples", self.bad_samples, BAD_SAMPLE_POLICIES)
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"hw_decoder_load: must be in [0, 1], got {self.hw_decoder_load}")
        _at_least("threads", self.threads, 0)
        _at_least("prefetch", self.prefetch, 1)


@dataclass
class FfcvOptions(BackendOptions):
    """``ffcv``: a prepared ``.beton`` read by FFCV."""

    os_cache: bool = True  # read the .beton through the OS page cache (false: FFCV's own quasi-random reads)
    batches_ahead: int = 2  # batches FFCV prepares ahead

    def __post_init__(self) -> None:
        _at_least("batches_ahead", self.batches_ahead, 0)


#: the built-in backends' options classes (the config's ``data.<backend>`` sections)
BUILTIN_OPTIONS: dict[str, type[BackendOptions]] = {
    "pil": PilOptions, "torch": TorchOptions, "dali": DaliOptions, "ffcv": FfcvOptions}
