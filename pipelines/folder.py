"""Scanning an ImageFolder (``root/<class>/**/<image>``) quickly with ``os.scandir``."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from pipelines.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
log = logging.getLogger("pipelines")
#: What ``swav-fast prepare`` writes in a split folder; other tools (``swav-fast synth`` among them) may
#: leave a file of the same name in an ImageFolder, so a manifest is recognised by its content.
MANIFEST_NAME = "manifest.json"
PREPARED_FORMATS = ("tfrecord", "wds", "beton")


@dataclass
class ImageFolderIndex:
    """Classes (sorted) and samples ``(path relative to root, class index)`` sorted by class then path."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> str:
        """Absolute path of sample ``i``."""
        return os.path.join(self.root, self.samples[i][0])

    def label(self, i: int) -> int:
        return self.samples[i][1]


def is_prepared_manifest(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a ``swav-fast prepare`` manifest: a JSON object with a ``format`` of
    :data:`PREPARED_FORMATS` (its other keys are checked when it is read). Any other file (a foreign
    ``manifest.json`` in an
    ImageFolder, an unreadable one) is not: the folder is then read as an ImageFolder."""
    try:
        if os.path.getsize(path) > 1 << 30:
            return False
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") in PREPARED_FORMATS


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolderIndex:
    """Index ``root``: one sub-folder per class, images (any depth) with IMAGE_EXTENSIONS, hidden entries skipped."""
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.exists(root_s):
        raise DataError(f"dataset folder not found: {root_s}")
    if not os.path.isdir(root_s):
        raise DataError(f"dataset path is not a folder: {root_s} (expected an ImageFolder: ROOT/<class>/<image>)")
    try:
        with os.scandir(root_s) as it:
            classes = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot read dataset folder {root_s}: {e}") from e
    if not classes:
        raise DataError(f"no class sub-folders in {root_s} (expected an ImageFolder: ROOT/<class>/<image>)")

    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = sorted(_scan_images(os.path.join(root_s, name), name))
        if not files:
            empty.append(name)
        samples.extend((f, label) for f in files)
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root_s}")
    if empty:
        log.warning("%d class folder(s) under %s hold no images: %s", len(empty), root_s, ", ".join(empty[:10]))
    return ImageFolderIndex(root=root_s, classes=classes, samples=samples)


def _scan_images(top: str, rel_top: str) -> list[str]:
    """Relative paths (``/``-separated, from the dataset root) of the images under ``top``."""
    out: list[str] = []
    stack = [(top, rel_top)]
    seen: set[tuple[int, int]] = set()
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:  # symlink loop
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        stack.append((e.path, f"{rel}/{e.name}"))
                    elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                        out.append(f"{rel}/{e.name}")
        except OSError as e:
            raise DataError(f"cannot read dataset folder {path}: {e}") from e
    return out
