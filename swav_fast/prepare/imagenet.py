"""Sources as ImageNet is downloaded: the train tar of per-synset tars, the flat validation set and
its labels, and class / per-class subsets of any source.

Kinds of ``--src`` (:func:`detect_kind`):

* ``imagefolder``: ``SRC/<class>/**/<image>`` (as before);
* ``train-tar``: a tar whose members are tars, one per class (``ILSVRC2012_img_train.tar``: 1,000
  inner tars ``n01440764.tar`` ...); the class of an image is its inner tar's name;
* ``val-tar``: a tar of images without classes (``ILSVRC2012_img_val.tar``), with ``--labels``;
* ``val-folder``: a folder of such images (the extracted validation tar), with ``--labels``.

Archives are indexed by reading their member headers only (seeking from header to header, the
image data skipped), which gives the whole plan up front (sample count, shards, resume); the
workers then read each image's bytes by offset straight from the archive.  Nothing is extracted
to disk and no image data is held beyond the chunks in flight.  Sample ``i`` gets the path
``<class>/<file>`` that the extracted ImageFolder has and the samples are sorted the same way
(class, then path), so an archive and its extracted folder give the same labels and, from
``prepare``, the same shard bytes.

Validation labels (``--labels``):

* the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line ``k`` is the 1-based ILSVRC2012
  ID of ``ILSVRC2012_val_<k:08d>.JPEG``; IDs become synsets through the devkit's ``data/meta.mat``
  (read with scipy when it is installed) or ``--synsets FILE`` (one synset per line, line ``k``
  = ID ``k``).  ``--labels`` may also name the devkit folder or ``ILSVRC2012_devkit_t12.tar.gz``;
* Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` rows, the synset first.

An image without a label, or a label without an image, is an error naming the labels file before
any image is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from pipelines.folder import IMAGE_EXTENSIONS
from pipelines.formats.wds import TAR_BLOCK
from swav_fast.errors import DataError

from .sources import SourceList, scan_source

log = logging.getLogger("swav_fast.prepare")

KINDS = ("imagefolder", "train-tar", "val-tar", "val-folder")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
LOC_HEADER = ["ImageId", "PredictionString"]
#: Built-in ``--classes`` lists (data files beside this module).
BUILTIN_CLASSES = {"imagenet100": "imagenet100.txt"}
SUBSET_RULE = "the first N images of each class in sorted file-name order"
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)$")


# ----------------------------------------------------------------------------- entry point
def open_source(
    src: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    synsets: str | os.PathLike[str] | None = None,
    classes: str | None = None,
    per_class: int | None = None,
    progress: bool = False,
) -> SourceList:
    """The sorted :class:`SourceList` of ``src`` (any of :data:`KINDS`), labelled and subset.

    ``classes``: a file with one class per line, or a name in :data:`BUILTIN_CLASSES`; the kept
    classes are indexed in sorted order.  ``per_class``: keep :data:`SUBSET_RULE`.
    Raises :class:`DataError` for a missing source, unusable labels or an unknown class.
    """
    if per_class is not None and int(per_class) < 1:
        raise DataError(f"per_class must be >= 1, got {per_class}")
    if synsets is not None and labels is None:
        raise DataError(
            "--synsets maps the devkit's ILSVRC2012 IDs of --labels to synsets: pass --labels too"
        )
    wanted = read_class_list(classes) if classes is not None else None
    kind = detect_kind(src, labels is not None)
    if kind == "imagefolder":
        source = scan_source(src)
    elif kind == "train-tar":
        source = scan_train_tar(src, only=set(wanted) if wanted else None, progress=progress)
    else:
        table = read_labels(labels, synsets)  # type: ignore[arg-type]
        images = scan_flat_tar(src) if kind == "val-tar" else scan_flat_folder(src)
        source = label_flat(images, table)
    if wanted is not None or per_class is not None:
        source = select_subset(source, wanted, classes, per_class)
    return source


def detect_kind(src: str | os.PathLike[str], has_labels: bool) -> str:
    """One of :data:`KINDS` for ``src``; raises :class:`DataError` when it is none of them."""
    p = Path(src)
    if not p.exists():
        raise DataError(f"source not found: {os.path.abspath(p)}")
    if p.is_dir():
        flat = _has_top_level_images(p)
        if has_labels:
            if not flat:
                raise DataError(
                    f"{p} holds no images at its top level: --labels is for a flat folder of validation "
                    "images or ILSVRC2012_img_val.tar (an ImageFolder has its labels in its class folders)"
                )
            return "val-folder"
        if flat and not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(p)):
            raise DataError(
                f"{p} holds images but no class folders: a flat folder of validation images needs --labels "
                f"({GROUND_TRUTH} of the devkit, or LOC_val_solution.csv)"
            )
        return "imagefolder"
    first = _first_member(p)
    if first.lower().endswith(".tar"):
        if has_labels:
            raise DataError(
                f"--labels is for a flat validation source; {p} is a tar of per-class tars "
                "(its labels are the inner tar names)"
            )
        return "train-tar"
    if first.lower().endswith(IMAGE_EXTENSIONS):
        if not has_labels:
            raise DataError(
                f"{p} is an archive of images without classes: pass --labels ({GROUND_TRUTH} of the "
                "devkit, or LOC_val_solution.csv)"
            )
        return "val-tar"
    raise DataError(
        f"{p}: first member {first!r} is neither an inner .tar (ILSVRC2012_img_train.tar layout) "
        "nor an image (ILSVRC2012_img_val.tar layout)"
    )


def _has_top_level_images(p: Path) -> bool:
    with os.scandir(p) as it:
        return any(_is_image_name(e.name) and e.is_file() for e in it)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_member(name: str) -> bool:
    """A member an extracted copy's folder scan would list: an image, no hidden path component."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not any(x.startswith(".") for x in parts) and _is_image_name(parts[-1])


# ----------------------------------------------------------------------------- tar index
class _Window(io.RawIOBase):
    """Unbuffered read-only view of ``size`` bytes at ``base`` of ``f`` (an inner tar in place)."""

    def __init__(self, f: Any, base: int, size: int) -> None:
        super().__init__()
        self.f, self.base, self.size, self.pos = f, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, start + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.base + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class _Broken(Exception):
    """A tar that stops before its end-of-archive block; ``members`` are the complete ones before."""

    def __init__(self, members: list[tarfile.TarInfo], reason: str) -> None:
        super().__init__(reason)
        self.members = members


def _walk(view: _Window) -> list[tarfile.TarInfo]:
    """Every member of the tar in ``view``, by reading headers only; :class:`_Broken` if it is damaged.

    ``tarfile`` stops silently at a damaged or missing header, so the walk insists on finding the
    end-of-archive block (zeros) where the members end, and on every member's data lying inside.
    """
    members: list[tarfile.TarInfo] = []
    try:
        tf = tarfile.open(fileobj=view, mode="r:")  # type: ignore[call-overload]
        for m in tf:
            if m.offset_data + m.size > view.size:
                raise _Broken(
                    members,
                    f"truncated: member {m.name} needs bytes up to {m.offset_data + m.size}, "
                    f"the tar has {view.size}",
                )
            members.append(m)
    except tarfile.TarError as exc:
        raise _Broken(members, f"unreadable tar header after {len(members)} member(s) ({exc})") from None
    end = tf.offset
    view.seek(end)
    block = view.read(TAR_BLOCK)
    if len(block) < TAR_BLOCK:
        raise _Broken(members, f"truncated after {len(members)} member(s): no end-of-archive block")
    if block.count(0) != TAR_BLOCK:
        raise _Broken(members, f"invalid tar header at byte {end} after {len(members)} member(s)")
    return members


def _open_archive(path: Path) -> tuple[Any, int]:
    try:
        f = open(path, "rb", buffering=0)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return f, os.fstat(f.fileno()).st_size


def _first_member(path: Path) -> str:
    f, size = _open_archive(path)
    with f:
        head = f.read(4)
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zX":
            raise DataError(f"{path} is compressed: decompress it first (prepare reads plain .tar archives)")
        try:
            tf = tarfile.open(fileobj=_Window(f, 0, size), mode="r:")  # type: ignore[call-overload]
            for m in tf:
                if m.isreg():
                    return m.name
        except tarfile.TarError as exc:
            raise DataError(f"{path} is not a tar archive or an ImageFolder ({exc})") from None
    raise DataError(f"{path} is an empty tar archive")


def _outer_members(f: Any, size: int, path: Path) -> list[tarfile.TarInfo]:
    """The members of the archive itself: any damage is an error (the download is incomplete)."""
    try:
        return _walk(_Window(f, 0, size))
    except _Broken as exc:
        raise DataError(
            f"{path} is damaged or incomplete ({exc}); download it again (its size is {size} bytes)"
        ) from None


def scan_train_tar(
    src: str | os.PathLike[str], only: set[str] | None = None, progress: bool = False
) -> SourceList:
    """Index a tar of per-class tars; ``only``: index the images of these classes only.

    Classes are the inner tars' names without ``.tar`` (all of them, sorted).  A damaged inner tar
    keeps its complete members before the damage and is listed in ``bad``; a damaged outer archive
    is an error.
    """
    from tqdm import tqdm

    path = Path(os.path.abspath(src))
    f, size = _open_archive(path)
    entries: list[tuple[str, int, int]] = []
    bad: list[dict[str, str]] = []
    classes: list[str] = []
    with f:
        outer = [m for m in _outer_members(f, size, path) if m.isreg()]
        inner = [m for m in outer if m.name.lower().endswith(".tar")]
        if len(inner) < len(outer):
            log.warning("%s: ignoring %d member(s) that are not .tar files", path, len(outer) - len(inner))
        for m in tqdm(inner, desc=f"index {path.name}", unit="tar", disable=not progress, dynamic_ncols=True):
            cls = PurePosixPath(m.name).name[:-4]
            if cls in classes:
                raise DataError(f"{path}: two inner tars for class {cls!r}")
            classes.append(cls)
            if only is not None and cls not in only:
                continue
            try:
                members = _walk(_Window(f, m.offset_data, m.size))
            except _Broken as exc:
                reason = f"corrupt inner tar, images after it skipped: {exc}"
                bad.append({"path": f"{cls}.tar", "reason": reason})
                members = exc.members
            found = {}
            for im in members:  # a name stored twice: the last copy wins, as on extraction
                if im.isreg() and _image_member(im.name):  # "./a.JPEG" extracts to <class>/a.JPEG
                    rel = "/".join((cls, *(x for x in PurePosixPath(im.name).parts if x != "/")))
                    found[rel] = (m.offset_data + im.offset_data, im.size)
            entries.extend((rel, off, n) for rel, (off, n) in found.items())
    if not classes:
        raise DataError(f"{path} holds no inner .tar files")
    classes.sort()
    label_of = {c: k for k, c in enumerate(classes)}
    entries.sort(key=lambda e: (label_of[e[0].split("/", 1)[0]], e[0]))
    if not entries and not bad:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in the inner tars of {path}")
    return SourceList(
        root=str(path),
        classes=classes,
        paths=[e[0] for e in entries],
        labels=[label_of[e[0].split("/", 1)[0]] for e in entries],
        kind="train-tar",
        tar=str(path),
        offsets=np.array([e[1] for e in entries], dtype=np.int64),
        sizes=np.array([e[2] for e in entries], dtype=np.int64),
        bad=bad,
    )


@dataclass(frozen=True)
class FlatImages:
    """Unlabelled images: ``names[i]`` (file name) read from ``root/names[i]`` or the archive ``tar``."""

    root: str
    kind: str
    names: list[str]
    members: list[str] | None = None  # the archive member names (when not the plain file name)
    tar: str | None = None
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None


def scan_flat_tar(src: str | os.PathLike[str]) -> FlatImages:
    """The images of a flat archive (``ILSVRC2012_img_val.tar``), keyed by file name."""
    path = Path(os.path.abspath(src))
    f, size = _open_archive(path)
    with f:
        members = [m for m in _outer_members(f, size, path) if m.isreg() and _image_member(m.name)]
    names = [PurePosixPath(m.name).name for m in members]
    _no_duplicates(names, path)
    if not names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return FlatImages(
        root=str(path),
        kind="val-tar",
        names=names,
        members=[m.name for m in members],
        tar=str(path),
        offsets=np.array([m.offset_data for m in members], dtype=np.int64),
        sizes=np.array([m.size for m in members], dtype=np.int64),
    )


def scan_flat_folder(src: str | os.PathLike[str]) -> FlatImages:
    """The images at the top level of a folder (the extracted validation tar)."""
    root = os.path.abspath(src)
    try:
        with os.scandir(root) as it:
            names = sorted(e.name for e in it if _is_image_name(e.name) and e.is_file())
    except OSError as exc:
        raise DataError(f"cannot read {root}: {exc.strerror or exc}") from None
    if not names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) at the top level of {root}")
    return FlatImages(root=root, kind="val-folder", names=names)


def _no_duplicates(names: list[str], where: Path) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DataError(f"{where} holds two images named {n}")
        seen.add(n)


# ----------------------------------------------------------------------------- validation labels
@dataclass(frozen=True)
class LabelTable:
    """Validation labels: ``synset_of[key]`` for the images, ``key_of(file name)`` (None: no key)."""

    file: str
    format: str  # "devkit" or "loc-csv"
    synset_of: dict[Any, str]
    classes: list[str]  # every class the table knows, sorted
    key_of: Callable[[str], Any]
    describe: Callable[[Any], str]  # an image name for a key (for "no image for ..." errors)
    info: dict[str, Any]


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _val_number(name: str) -> int | None:
    m = _VAL_NUMBER.search(_stem(name))
    return int(m.group(1)) if m else None


def read_labels(labels: str | os.PathLike[str], synsets: str | os.PathLike[str] | None = None) -> LabelTable:
    """Parse ``--labels`` (devkit ground truth / its folder / its .tar.gz, or LOC_val_solution.csv)."""
    p = Path(labels)
    if not p.exists():
        raise DataError(f"labels file not found: {p}")
    meta: tuple[str, bytes] | None = None
    if p.is_dir():
        found = [q for q in (p / "data" / GROUND_TRUTH, p / GROUND_TRUTH) if q.is_file()]
        if not found:
            raise DataError(f"{p} holds no {GROUND_TRUTH} (in it or in data/)")
        p = found[0]
    if p.name.endswith((".tar.gz", ".tgz", ".tar")):
        where, text, meta = _read_devkit_archive(p)
    else:
        where, text = str(p), _read_text(p)
        if p.suffix.lower() == ".csv":
            return _loc_table(where, text)
        mat = p.parent / META_MAT
        if mat.is_file():
            meta = (str(mat), mat.read_bytes())
    if synsets is not None:
        id_synsets, mapping = read_synset_list(synsets), f"{synsets}"
    elif meta is not None:
        id_synsets, mapping = _synsets_from_meta(*meta), meta[0]
    else:
        raise DataError(
            f"{where} gives ILSVRC2012 IDs; map them to synsets with the devkit's {META_MAT} "
            f"(put it next to {Path(where).name}, or pass the devkit folder or .tar.gz as --labels) "
            "or with --synsets FILE (one synset per line, line k = ILSVRC2012 ID k)"
        )
    return _devkit_table(where, text, id_synsets, mapping)


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {p}: {exc}") from None


def _read_devkit_archive(p: Path) -> tuple[str, str, tuple[str, bytes] | None]:
    try:
        with tarfile.open(p) as tf:
            names = {PurePosixPath(m.name).name: m for m in tf if m.isreg()}
            if GROUND_TRUTH not in names:
                raise DataError(f"{p} holds no {GROUND_TRUTH}: is it the ILSVRC2012 devkit?")
            text = tf.extractfile(names[GROUND_TRUTH]).read().decode("utf-8")  # type: ignore[union-attr]
            meta = None
            if META_MAT in names:
                meta = (f"{p}:{names[META_MAT].name}", tf.extractfile(names[META_MAT]).read())  # type: ignore
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the devkit archive {p}: {exc}") from None
    return f"{p}:{names[GROUND_TRUTH].name}", text, meta


def _synsets_from_meta(where: str, data: bytes) -> list[str]:
    """Synsets of the devkit's ``meta.mat`` in ILSVRC2012 ID order (IDs 1..K of the leaf classes)."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(
            f"reading {where} needs scipy (pip install scipy); or pass --synsets FILE with the synsets "
            "in devkit order (line k = ILSVRC2012 ID k)"
        ) from None
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
        table = np.atleast_1d(mat["synsets"])
        ids = [int(v) for v in np.atleast_1d(table["ILSVRC2012_ID"])]
        wnids = [str(v) for v in np.atleast_1d(table["WNID"])]
        leaf = (
            [int(v) == 0 for v in np.atleast_1d(table["num_children"])]
            if "num_children" in (table.dtype.names or ())
            else [True] * len(ids)
        )
    except Exception as exc:  # noqa: BLE001 - any parse failure: not the devkit's meta.mat
        raise DataError(f"cannot read the synsets of {where}: {type(exc).__name__}: {exc}") from None
    by_id = {i: w for i, w, is_leaf in zip(ids, wnids, leaf) if is_leaf}
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise DataError(f"{where}: the leaf synsets' ILSVRC2012 IDs are not 1..{len(by_id)}")
    return [by_id[i] for i in range(1, len(by_id) + 1)]


def read_synset_list(path: str | os.PathLike[str]) -> list[str]:
    """Names, one per line (blank lines and ``#`` comments skipped); an error for a duplicate."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class list not found: {p}")
    out: list[str] = []
    seen: set[str] = set()
    for ln, line in enumerate(_read_text(p).splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if len(name.split()) != 1:
            raise DataError(f"{p}, line {ln}: expected one class name, got {name!r}")
        if name in seen:
            raise DataError(f"{p}, line {ln}: {name} is listed twice")
        seen.add(name)
        out.append(name)
    if not out:
        raise DataError(f"{p} lists no classes")
    return out


def _devkit_table(where: str, text: str, id_synsets: list[str], mapping: str) -> LabelTable:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    synset_of: dict[int, str] = {}
    for k, line in enumerate(lines, start=1):
        try:
            ident = int(line.strip())
        except ValueError:
            raise DataError(f"{where}, line {k}: {line.strip()[:40]!r} is not an ILSVRC2012 ID") from None
        if not 1 <= ident <= len(id_synsets):
            raise DataError(
                f"{where}, line {k}: ID {ident} has no synset in {mapping} (it maps 1..{len(id_synsets)})"
            )
        synset_of[k] = id_synsets[ident - 1]
    return _table(where, "devkit", text, synset_of, id_synsets, _val_number,
                  lambda k: f"ILSVRC2012_val_{k:08d}.JPEG (line {k})", synsets=mapping)


def _loc_table(where: str, text: str) -> LabelTable:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or [h.strip() for h in header] != LOC_HEADER:
        raise DataError(
            f"{where}: expected the header {','.join(LOC_HEADER)} (Kaggle's LOC_val_solution.csv)"
        )
    synset_of: dict[str, str] = {}
    for ln, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        tokens = row[1].split() if len(row) == 2 else []
        if not tokens:
            raise DataError(f"{where}, line {ln}: expected 'ImageId,synset ...', got {','.join(row)[:60]!r}")
        key = _stem(row[0].strip())
        if key in synset_of:
            raise DataError(f"{where}, line {ln}: {key} is listed twice")
        synset_of[key] = tokens[0]
    return _table(where, "loc-csv", text, synset_of, synset_of.values(), _stem, str)


def _table(
    where: str,
    fmt: str,
    text: str,
    synset_of: dict[Any, str],
    known: Any,
    key_of: Callable[[str], Any],
    describe: Callable[[Any], str],
    **info: str,
) -> LabelTable:
    if not synset_of:
        raise DataError(f"{where} holds no labels")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return LabelTable(
        file=where,
        format=fmt,
        synset_of=synset_of,
        classes=sorted(set(known)),
        key_of=key_of,
        describe=describe,
        info={"file": where, "format": fmt, **info, "sha256": sha},
    )


def label_flat(images: FlatImages, table: LabelTable) -> SourceList:
    """Label every image through ``table``; an image without a label (or the reverse) is an error."""
    keys = [table.key_of(n) for n in images.names]
    missing = [n for n, k in zip(images.names, keys) if k is None or k not in table.synset_of]
    if missing:
        raise DataError(
            f"{table.file}: no label for {len(missing)} of the {len(keys)} images of {images.root} "
            f"(first: {missing[0]})"
        )
    seen: dict[Any, str] = {}
    for n, k in zip(images.names, keys):
        if k in seen:
            raise DataError(
                f"{table.file}: images {seen[k]} and {n} of {images.root} get the same label entry"
            )
        seen[k] = n
    extra = [k for k in table.synset_of if k not in seen]
    if extra:
        raise DataError(
            f"{table.file}: {len(extra)} label(s) for images that {images.root} does not hold "
            f"(first: {table.describe(extra[0])})"
        )
    label_of = {c: i for i, c in enumerate(table.classes)}
    rows = sorted(
        ((table.synset_of[k], n, i) for i, (n, k) in enumerate(zip(images.names, keys))),
        key=lambda r: (label_of[r[0]], r[1]),
    )
    order = [i for _, _, i in rows]
    return SourceList(
        root=images.root,
        classes=list(table.classes),
        paths=[f"{c}/{n}" for c, n, _ in rows],
        labels=[label_of[c] for c, _, _ in rows],
        kind=images.kind,
        files=[images.names[i] for i in order] if images.tar is None else None,
        tar=images.tar,
        offsets=None if images.offsets is None else images.offsets[order],
        sizes=None if images.sizes is None else images.sizes[order],
        info={"labels": table.info},
    )


# ----------------------------------------------------------------------------- subsets
def class_list_path(spec: str) -> Path:
    """The file behind ``--classes``: a built-in name (:data:`BUILTIN_CLASSES`) or a path."""
    if spec in BUILTIN_CLASSES:
        return Path(__file__).with_name(BUILTIN_CLASSES[spec])
    return Path(spec)


def read_class_list(spec: str) -> list[str]:
    p = class_list_path(spec)
    if not p.is_file() and spec not in BUILTIN_CLASSES:
        raise DataError(
            f"--classes {spec}: no such file (give a file with one class per line, "
            f"or one of: {', '.join(BUILTIN_CLASSES)})"
        )
    return read_synset_list(p)


def select_subset(
    source: SourceList, wanted: list[str] | None, spec: str | None, per_class: int | None
) -> SourceList:
    """Keep the classes ``wanted`` (re-indexed in sorted order) and at most ``per_class`` images of each."""
    classes = source.classes
    if wanted is not None:
        have = set(classes)
        absent = [c for c in wanted if c not in have]
        if absent:
            raise DataError(
                f"{class_list_path(spec or '')}: {len(absent)} of its {len(wanted)} classes are not in "
                f"{source.root} (first: {', '.join(absent[:3])})"
            )
        classes = sorted(wanted)
    new_label = {source.classes.index(c): k for k, c in enumerate(classes)}
    keep, labels = [], []
    taken = [0] * len(classes)
    for i, lab in enumerate(source.labels):
        k = new_label.get(lab)
        if k is None or (per_class is not None and taken[k] >= per_class):
            continue
        taken[k] += 1
        keep.append(i)
        labels.append(k)
    if not keep:
        raise DataError(f"the chosen subset of {source.root} holds no images")
    subset: dict[str, Any] = {"num_classes": len(classes), "per_class": per_class}
    if spec is not None:
        p = class_list_path(spec)
        subset["classes"] = spec if spec in BUILTIN_CLASSES else str(p.resolve())
        subset["classes_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    if per_class is not None:
        subset["rule"] = SUBSET_RULE
    kept_classes = set(classes)
    bad = [b for b in source.bad if b["path"].split("/", 1)[0].removesuffix(".tar") in kept_classes]
    out = source.subset(keep, classes, labels)
    return replace(out, bad=bad, info={**source.info, "subset": subset})


def source_params(classes: str | None, per_class: int | None) -> dict[str, Any]:
    """The settings a subset adds to the prepare plan (nothing when there is no subset)."""
    out: dict[str, Any] = {}
    if classes is not None:
        out["classes"] = classes if classes in BUILTIN_CLASSES else str(Path(classes).resolve())
    if per_class is not None:
        out["per_class"] = int(per_class)
    return out
