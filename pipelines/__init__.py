"""Multi-crop data pipelines: one :class:`MultiCropSpec`, several loader backends behind :func:`build_loader`."""

from .folder import IMAGE_EXTENSIONS, ImageFolderIndex, scan_image_folder
from .loader import MultiCropBatch, MultiCropLoader, available_backends, build_loader, register_backend
from .params import ViewParams, sample_batch_params, sample_params_for_indices, sample_rng, sample_view_params
from .spec import MultiCropSpec

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
