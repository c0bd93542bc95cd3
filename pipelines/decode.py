"""Batched JPEG decoding through a maintained API: TorchCodec first, torchvision.io only as the fallback.

torchvision 0.29 deprecates its ``torchvision.io`` image decoding in favour of TorchCodec, whose
``torchcodec.decoders.decode_jpeg(list, device=...)`` decodes a whole batch in one nvJPEG call on
CUDA (libjpeg-turbo on the CPU).  NVIDIA nvImageCodec is offered too when it is installed (it needs a
CUDA device, also for its CPU codecs).

Decoders (:data:`pipelines.options.DECODERS`, ``data.torch.decoder``):

- ``auto``: ``torchcodec`` when it imports, else ``torchvision`` (the fallback, used only then);
- ``torchcodec``, ``torchvision``, ``nvimgcodec``: that one (a :class:`ConfigError` when missing).

Every decoder returns the same thing: ``[3, H, W]`` uint8 RGB on ``device``, EXIF orientation applied
(the image as displayed, the rule of every loader, :mod:`pipelines.exif`).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipelines.errors import ConfigError, DataError

from .exif import orient_chw
from .formats.probe import jpeg_orientation

Encoded = bytes | bytearray | memoryview | torch.Tensor
#: a batch decoder: (1-D uint8 CPU tensors, their bytes, device) -> images; raises on any bad item
BatchDecoder = Callable[[list[torch.Tensor], list[bytes | bytearray], torch.device], list[torch.Tensor]]


def _as_tensor(data: Encoded) -> torch.Tensor:
    """A 1-D uint8 CPU tensor over the encoded bytes (no copy for writable buffers)."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1)
    if isinstance(data, bytes | memoryview) or not data:
        data = bytearray(data)  # torch.frombuffer needs a writable buffer to avoid a warning
    return torch.frombuffer(data, dtype=torch.uint8)


def _as_bytes(data: Encoded) -> bytes | bytearray:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).numpy().tobytes()
    return data if isinstance(data, bytes | bytearray) else bytes(data)


# -- the decoders ---------------------------------------------------------------------------------
def _import_torchcodec() -> tuple[Any, str | None]:
    """``(torchcodec.decoders.decode_jpeg, None)``, or ``(None, why it is unusable)``."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception as exc:  # noqa: BLE001 - ImportError, or a native library that fails to load
        return None, f"{type(exc).__name__}: {exc}"
    return decode_jpeg, None


def _import_nvimgcodec() -> tuple[Any, str | None]:
    try:
        from nvidia import nvimgcodec
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"
    return nvimgcodec, None


def _torchcodec(buffers: list[torch.Tensor], datas: list[bytes | bytearray], device: torch.device
                ) -> list[torch.Tensor]:
    decode_jpeg, why = _import_torchcodec()
    if decode_jpeg is None:
        raise ConfigError(f"the torchcodec JPEG decoder is not usable ({why}); pip install torchcodec")
    return list(decode_jpeg(buffers, mode="RGB", device=device))  # EXIF orientation applied


def _torchvision(buffers: list[torch.Tensor], datas: list[bytes | bytearray], device: torch.device
                 ) -> list[torch.Tensor]:
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # the deprecation notice of torchvision.io: this is the fallback
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message="The image decoding and encoding capabilities of TorchVision")
        images = decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)
    return [orient_chw(img, jpeg_orientation(d)) for img, d in zip(images, datas)]


_NVIMG_DECODERS: dict[int, Any] = {}
_NVIMG_LOCK = threading.Lock()


def _nvimgcodec(buffers: list[torch.Tensor], datas: list[bytes | bytearray], device: torch.device
                ) -> list[torch.Tensor]:
    nv, why = _import_nvimgcodec()
    if nv is None:
        raise ConfigError(f"the nvimgcodec JPEG decoder is not usable ({why}); "
                          "pip install nvidia-nvimgcodec-cu13")
    dev_id = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else nv.NVIMGCODEC_DEVICE_CPU_ONLY
    with _NVIMG_LOCK:
        dec = _NVIMG_DECODERS.get(dev_id)
        if dec is None:
            dec = _NVIMG_DECODERS[dev_id] = nv.Decoder(device_id=dev_id)
    params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB,
                             sample_format=nv.SampleFormat.I_RGB)  # HWC uint8 RGB, as displayed
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["cuda_stream"] = torch.cuda.current_stream(device).cuda_stream
    images = dec.decode([nv.CodeStream(bytes(d)) for d in datas], params=params, **kwargs)
    out = []
    for k, img in enumerate(images):
        if img is None:
            raise DataError(f"nvimgcodec could not decode item {k}")
        if device.type == "cuda":
            hwc = torch.as_tensor(img, device=device)
        else:
            hwc = torch.from_numpy(np.asarray(img.cpu()))
        out.append(hwc.permute(2, 0, 1).contiguous())
    if device.type == "cuda":  # the copies read nvImageCodec's buffers, freed with `images`: let them finish
        torch.cuda.current_stream(device).synchronize()
    return out


_DECODERS: dict[str, BatchDecoder] = {"torchcodec": _torchcodec, "torchvision": _torchvision,
                                      "nvimgcodec": _nvimgcodec}


def decoder_status() -> dict[str, str | None]:
    """Each decoder -> None when usable here, else why not (``torchvision`` is always usable;
    ``nvimgcodec`` needs a CUDA device)."""
    status: dict[str, str | None] = {"torchcodec": _import_torchcodec()[1], "torchvision": None}
    why = _import_nvimgcodec()[1]
    if why is None and not torch.cuda.is_available():
        why = "it needs a CUDA device (also for its CPU codecs)"
    status["nvimgcodec"] = why
    return status


def resolve_decoder(name: str = "auto") -> str:
    """The decoder ``name`` selects: ``auto`` -> ``torchcodec`` if it imports, else ``torchvision``.
    An explicit decoder that is not installed is a :class:`ConfigError`."""
    if name == "auto":
        return "torchcodec" if _import_torchcodec()[0] is not None else "torchvision"
    if name not in _DECODERS:
        raise ConfigError(f"unknown JPEG decoder {name!r}; valid: auto, {', '.join(_DECODERS)}")
    why = decoder_status()[name]
    if why is not None:
        raise ConfigError(f"JPEG decoder {name!r} is not usable: {why}")
    return name


# -- the API --------------------------------------------------------------------------------------
def decode_jpegs_each(datas: Sequence[Encoded], device: Any = "cpu", decoder: str = "auto"
                      ) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode a batch of JPEGs in one call: ``(image or None, error or None)`` per item.

    Images are ``[3, H, W]`` uint8 RGB on ``device`` as displayed (EXIF orientation applied).  When the
    batched call fails, each item is decoded alone, so one bad file never costs the batch.
    """
    dev = torch.device(device)
    fn = _DECODERS[resolve_decoder(decoder)]
    buffers = [_as_tensor(d) for d in datas]
    raw = [_as_bytes(d) for d in datas]
    if not buffers:
        return [], []
    try:
        return list(fn(buffers, raw, dev)), [None] * len(buffers)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - some item is bad: find which, one by one
        pass
    images: list[torch.Tensor | None] = []
    errors: list[str | None] = []
    for buf, d in zip(buffers, raw):
        try:
            images.append(fn([buf], [d], dev)[0])
            errors.append(None)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
            images.append(None)
            errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return images, errors


def decode_jpegs(datas: Sequence[Encoded], device: Any = "cpu", decoder: str = "auto",
                 names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Decode a batch of JPEGs (one batched call; nvJPEG on CUDA): ``[3, H, W]`` uint8 RGB each.

    A sample that does not decode raises :class:`DataError` naming it (``names[i]``, else its
    position in the batch) and the decoder's reason.
    """
    images, errors = decode_jpegs_each(datas, device, decoder)
    for k, err in enumerate(errors):
        if err is not None:
            name = names[k] if names is not None else f"item {k} of the batch"
            raise DataError(f"{name}: not a decodable JPEG ({err})")
    return images  # type: ignore[return-value]
