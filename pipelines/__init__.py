"""Multi-crop data pipelines: one :class:`MultiCropSpec`, several loader backends behind :func:`build_loader`.

Importing the package is light (no torch): the loader API and the backends are imported on first use
of one of their names, so that ``swav-fast --help`` and config parsing need not load torch.
"""

from .formats.lazy import lazy_names

from .folder import IMAGE_EXTENSIONS, ImageFolderIndex, scan_image_folder
from .spec import MultiCropSpec

#: names of the loader API -> the submodule that defines them (imported on first access)
_LAZY = {"MultiCropBatch": "loader", "MultiCropLoader": "loader", "available_backends": "loader",
         "build_loader": "loader", "register_backend": "loader", "ViewParams": "params",
         "sample_params": "params", "sample_params_for_indices": "params", "sample_uniforms": "params",
         "view_uniforms": "params", "BACKENDS": "loader", "decode_jpegs": "decode",
         "BackendOptions": "options", "PilOptions": "options", "TorchOptions": "options",
         "DaliOptions": "options", "FfcvOptions": "options"}

__getattr__ = lazy_names(__name__, globals(), _LAZY)


__all__ = [
    "BACKENDS",
    "BackendOptions",
    "DaliOptions",
    "FfcvOptions",
    "IMAGE_EXTENSIONS",
    "ImageFolderIndex",
    "MultiCropBatch",
    "MultiCropLoader",
    "MultiCropSpec",
    "PilOptions",
    "TorchOptions",
    "ViewParams",
    "available_backends",
    "build_loader",
    "decode_jpegs",
    "register_backend",
    "sample_params",
    "sample_params_for_indices",
    "sample_uniforms",
    "scan_image_folder",
    "view_uniforms",
]
