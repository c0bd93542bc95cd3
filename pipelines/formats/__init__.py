"""The formats layer, at the bottom of the project: every stored dataset format with one reader and one
writer, used by ``swav-fast prepare`` and ``inspect`` and by every loader backend.

=========  =====================================  ============================================
format     module                                 reader / writer
=========  =====================================  ============================================
folder     :mod:`.folder`                         ``ImageFolderSource`` / ``ImageFolderWriter``
tfrecord   :mod:`.tfrecord` (+ ``tfrecord2idx``)  ``TFRecordSource`` / ``TFRecordShardWriter``
wds        :mod:`.wds` (+ ``wds2idx``)            ``WebDatasetSource`` / ``WdsShardWriter``
beton      :mod:`.beton` (FFCV v2)                ``BetonSource`` / ``BetonWriter``
manifest   :mod:`.manifest`                       ``read_manifest`` / ``write_json_atomic``
=========  =====================================  ============================================

:func:`open_source` opens any of them by path; :mod:`.probe` is the one encoded-image header check.
Nothing here imports torch or anything of ``swav_fast``.
"""

from .lazy import lazy_names

_LAZY = {"open_source": "sources", "detect_format": "sources", "ALL_FORMATS": "sources",
         "SampleSource": "sources", "BadImage": "probe", "image_size": "probe", "MAX_PIXELS": "probe"}

__getattr__ = lazy_names(__name__, globals(), _LAZY)


__all__ = sorted(_LAZY)
