"""``open_source(path)``: random access to ``(encoded image bytes, label)`` over any stored format.

The format is detected from the path: a folder holding a ``swav-fast prepare`` manifest (recognised by
its content: an ImageFolder may hold a foreign ``manifest.json``) is read as its ``format`` says
(TFRecord, webdataset, beton); a ``.beton`` file is a beton; any other folder is an ImageFolder.
A loader backend passes the formats it reads (``formats=``); a dataset in another format is a
:class:`~pipelines.errors.ConfigError` naming the backends that read it.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

from pipelines.errors import ConfigError, DataError

from .folder import ImageFolderIndex, ImageFolderSource, scan_image_folder
from .manifest import MANIFEST_NAME, is_prepared_manifest, read_manifest

#: Every format a source can be opened for ("folder" is an ImageFolder).
ALL_FORMATS = ("folder", "tfrecord", "wds", "beton")


class SampleSource(Protocol):
    """Random access to ``(encoded image bytes, label)`` by global sample index."""

    root: str
    classes: list[str]
    #: one of :data:`ALL_FORMATS`
    format: str

    def __len__(self) -> int: ...

    def read(self, i: int) -> tuple[bytes | bytearray, int]:
        """Encoded bytes and label of sample ``i``; raises :class:`~.probe.BadImage` for an unreadable one."""
        ...

    def name(self, i: int) -> str:
        """A human-readable location of sample ``i`` (file path, or ``shard#key``) for logs and reports."""
        ...

    def close(self) -> None:
        """Release open files / memory maps (reopened on the next read)."""
        ...


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"folder"``, ``"tfrecord"``, ``"wds"`` or ``"beton"`` for a dataset path (no shard is opened)."""
    root = os.path.abspath(os.fspath(path))
    if root.endswith(".beton") and os.path.isfile(root):
        return "beton"
    if not is_prepared_manifest(os.path.join(root, MANIFEST_NAME)):
        for sub in ("train", "val"):  # the parent of prepared splits is neither
            if is_prepared_manifest(os.path.join(root, sub, MANIFEST_NAME)):
                raise DataError(f"{root} holds prepared splits, not one: pass {os.path.join(root, sub)}")
        return "folder"
    return str(read_manifest(root)["format"])


def _readers_of(fmt: str) -> str:
    try:
        from pipelines.loader import backends_reading
    except ImportError:  # pragma: no cover - the loader needs torch
        return ""
    names = backends_reading(fmt)
    return f"; read it with data.loader={' or '.join(names)}" if names else ""


def open_source(source: str | os.PathLike[str] | ImageFolderIndex | Any,
                formats: Sequence[str] = ALL_FORMATS) -> SampleSource:
    """A sample source for a dataset path (any of :data:`ALL_FORMATS` in ``formats``), an
    :class:`ImageFolderIndex`, or an already opened source (returned as is)."""
    if isinstance(source, ImageFolderIndex) and not hasattr(source, "beton"):
        return ImageFolderSource(source)
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, ImageFolderIndex):  # a BetonIndex
            source = source.beton
        else:
            return source
    root = os.path.abspath(os.fspath(source))
    fmt = detect_format(root)
    if fmt not in formats:
        what = "an ImageFolder" if fmt == "folder" else f"a {fmt} dataset"
        raise ConfigError(f"{root} holds {what}, which this loader does not read{_readers_of(fmt)}")
    if fmt == "folder":
        return ImageFolderSource(scan_image_folder(root))
    if fmt == "beton":
        from .beton import BetonSource

        return BetonSource(root)  # type: ignore[return-value]
    manifest = read_manifest(root)
    if fmt == "tfrecord":
        from .tfrecord import TFRecordSource

        src: Any = TFRecordSource(root, manifest)
    else:
        from .wds import WebDatasetSource

        src = WebDatasetSource(root, manifest)
    if manifest.get("num_samples") is not None and int(manifest["num_samples"]) != len(src):
        raise DataError(f"{root}: the shards hold {len(src)} samples but the manifest says "
                        f"{manifest['num_samples']}")
    if not len(src):
        raise DataError(f"{root}: the prepared dataset holds no samples")
    return src
