"""ImageFolder (``root/<class>/**/<image>``): a fast ``os.scandir`` listing, a random-access source, a writer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipelines.errors import DataError

from .probe import BadImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
log = logging.getLogger("pipelines")


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


def read_file(path: str) -> bytearray:
    """The bytes of ``path`` (a writable buffer, so ``torch.frombuffer`` needs no copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        got = f.readinto(buf)
    if got != size:
        raise OSError(f"read {got} of {size} bytes")
    return buf


class ImageFolderSource:
    """An ImageFolder as a random-access sample source: one file per sample (see :mod:`.sources`)."""

    format = "folder"

    def __init__(self, index: ImageFolderIndex) -> None:
        import numpy as np  # here: `import pipelines` (and its folder scan) stays light

        self.root = index.root
        self.classes = list(index.classes)
        self.index = index  # the listing (reads use the arrays below)
        # numpy arrays, not Python lists: forked DataLoader workers then do not copy them page by page
        self._paths = np.array([p.encode("utf-8") for p, _ in index.samples])
        self._labels = np.array([c for _, c in index.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def read(self, i: int) -> tuple[bytearray, int]:
        """The file's bytes (a writable buffer) and its label; :class:`BadImage` if it cannot be read."""
        try:
            return read_file(self.name(i)), int(self._labels[i])
        except OSError as e:
            raise BadImage(f"cannot read file ({e.strerror or e})") from e

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def name(self, i: int) -> str:
        return os.path.join(self.root, self._paths[i].decode("utf-8"))

    def close(self) -> None:
        """Nothing to release (files are opened per read)."""


class ImageFolderWriter:
    """Writes samples as ``root/<class>/<key>.jpg`` (the layout :func:`scan_image_folder` reads back in
    the same order: ``key`` is the zero-padded sample index)."""

    def __init__(self, root: str | os.PathLike[str], classes: Sequence[str], digits: int = 8) -> None:
        self.root = Path(root)
        self.classes = list(classes)
        self.digits = int(digits)
        try:
            for c in self.classes:
                (self.root / c).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create ImageFolder {self.root}: {e.strerror or e}") from None
        self.num_samples = 0

    def add(self, index: int, label: int, jpeg: bytes) -> Path:
        path = self.root / self.classes[int(label)] / f"{int(index):0{self.digits}d}.jpg"
        path.write_bytes(bytes(jpeg))
        self.num_samples += 1
        return path
