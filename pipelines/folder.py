"""ImageFolder scanning: :mod:`pipelines.formats.folder` (re-exported here, where the loaders import it)."""

from .formats.folder import IMAGE_EXTENSIONS, ImageFolderIndex, read_file, scan_image_folder
from .formats.manifest import FORMATS as PREPARED_FORMATS
from .formats.manifest import MANIFEST_NAME, is_prepared_manifest

__all__ = ["IMAGE_EXTENSIONS", "MANIFEST_NAME", "PREPARED_FORMATS", "ImageFolderIndex", "is_prepared_manifest",
           "read_file", "scan_image_folder"]
