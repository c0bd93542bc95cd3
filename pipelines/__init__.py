"""Multi-crop data pipelines: one :class:`MultiCropSpec`, several loader backends behind :func:`build_loader`."""

from .folder import IMAGE_EXTENSIONS, ImageFolderIndex, scan_image_folder
from .loader import MultiCropBatch, MultiCropLoader, available_backends, build_loader, register_backend
from .params import ViewParams, sample_batch_params, sample_params_for_indices, sample_rng, sample_view_params
from .spec import MultiCropSpec

# Backends register themselves; optional dependencies (DALI, FFCV) are imported when a loader is built.
from . import torch_backend  # noqa: E402,F401  ("torch": batched decode_jpeg + batched crop/colour)
from . import dali_backend  # noqa: E402,F401  ("dali": ImageFolder, TFRecord, webdataset)
from . import ffcv_backend  # noqa: E402,F401  ("ffcv": a prepared .beton)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderIndex",
    "MultiCropBatch",
    "MultiCropLoader",
    "MultiCropSpec",
    "ViewParams",
    "available_backends",
    "build_loader",
    "register_backend",
    "sample_batch_params",
    "sample_params_for_indices",
    "sample_rng",
    "sample_view_params",
    "scan_image_folder",
]
