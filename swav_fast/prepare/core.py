"""``prepare_dataset``: ImageFolder or ImageNet archive -> sharded TFRecord / webdataset / FFCV beton,
atomic and resumable (the source kinds are in :mod:`swav_fast.prepare.imagenet`; the shard formats'
one writer each is in :mod:`pipelines.formats`, which the loaders and ``inspect`` read with).

Plan: the source is sorted (class, then path) and sample ``i`` goes to shard ``i // shard_size``,
so the plan depends only on the source and the settings, never on timing or worker count.
Workers decode and encode images in parallel; the main process consumes their results *in
source order* and writes, so the bytes of every output file are deterministic.

Resuming: ``OUT/<split>/.prepare-work/`` holds ``plan.json`` (settings + source fingerprint) and one
record per finished shard, written after the shard was renamed into place.  A rerun with the same
plan skips shards whose record and files are present; anything else (``.tmp`` files of a killed
run) is rewritten.  The beton is one file written in order: a record marks each finished chunk of
``shard_size`` samples (with its metadata rows) and a rerun truncates the temp file to the last one.
When all shards are done the manifest is written (atomically) and the work folder removed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from swav_fast.errors import DataError

from pipelines.formats.beton import ALLOC, DEFAULT_PAGE_SIZE, SAMPLE_META, BetonWriter, check_page_size, join_rows
from pipelines.formats.manifest import (
    FORMATS,
    LAYOUT,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    read_manifest,
    shard_name,
    validate_manifest,
    write_json_atomic,
)
from pipelines.formats.shardfile import ShardWriter
from pipelines.formats.tfrecord import TFRecordShardWriter
from pipelines.formats.wds import WdsShardWriter, key_digits

from .imagenet import open_source, source_params
from .sources import ItemSpec, SourceList, encode_chunk

log = logging.getLogger("swav_fast.prepare")

DEFAULT_SHARD_SIZE = 1000
WORK_DIR = ".prepare-work"
LOCK_NAME = ".prepare.lock"
#: Test-only hook: ``"N"`` makes a run stop (sleep) after N finished shards and half of the next one,
#: so a test can SIGKILL it mid-shard.  Unset in normal runs.
PAUSE_ENV = "SWAV_FAST_TEST_PREPARE_PAUSE"
PAUSE_MESSAGE = "prepare: test pause"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Images per task sent to a worker process.
_CHUNK = 16
#: The progress bar always shows the rate (images/s) and the time left, whatever the terminal width.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"


def prepare_dataset(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str,
    *,
    split: str = "train",
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_resolution: int | None = None,
    quality: int | None = None,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    labels: str | os.PathLike[str] | None = None,
    synsets: str | os.PathLike[str] | None = None,
    classes: str | None = None,
    per_class: int | None = None,
) -> dict[str, Any]:
    """Convert ``src`` into ``out/<split>/`` shards of format ``fmt``; return the manifest.

    ``src``: an ImageFolder, a tar of per-class tars (``ILSVRC2012_img_train.tar``), or a flat tar /
    folder of validation images with ``labels`` (the devkit ground truth, with its ``meta.mat`` or
    ``synsets``, or ``LOC_val_solution.csv``).  ``classes`` (a file with one class per line, or
    ``"imagenet100"``) and ``per_class`` (the first N images of each class by file name) choose a
    subset; both are recorded in the manifest (``subset``).

    ``fmt``: ``"tfrecord"``, ``"wds"`` or ``"beton"``.  ``shard_size``: source images per shard (a
    shard holds fewer when some are bad).  ``max_resolution``: long side limit (aspect kept).
    ``quality``: None passes valid RGB JPEGs through unchanged and re-encodes the rest at 90; an
    integer re-encodes everything at that quality.  ``workers``: 0 = all cores, 1 = in-process.
    ``overwrite``: replace a finished dataset with other settings (otherwise an error).
    ``page_size``: beton page size (power of two; a JPEG larger than it is listed as bad).

    Bad files are skipped and listed in ``manifest["bad_files"]``; the run never stops on one file.
    Raises :class:`DataError` for a missing/empty source, an unwritable output, or no readable image.
    """
    fmt = _check_args(fmt, split, shard_size, max_resolution, quality, workers)
    if fmt == "beton":
        page_size = check_page_size(page_size)
    source = open_source(
        src, labels=labels, synsets=synsets, classes=classes, per_class=per_class, progress=progress
    )
    split_dir = Path(out) / split
    _make_dir(split_dir)
    with _DirLock(split_dir):
        return _Preparer(
            source,
            split_dir,
            fmt,
            split,
            int(shard_size),
            max_resolution,
            quality,
            workers,
            progress,
            overwrite,
            page_size,
            source_params(classes, per_class),
        ).run()


def _check_args(
    fmt: str, split: str, shard_size: int, max_resolution: int | None, quality: int | None, workers: int
) -> str:
    fmt = {"webdataset": "wds", "ffcv": "beton"}.get(str(fmt).lower(), str(fmt).lower())
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not _SPLIT_RE.match(split or ""):
        raise DataError(
            f"invalid split name {split!r}: use letters, digits, '_', '-' or '.' (e.g. train, val)"
        )
    if int(shard_size) < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    if max_resolution is not None and int(max_resolution) < 8:
        raise DataError(f"max_resolution must be >= 8 pixels (or None), got {max_resolution}")
    if quality is not None and not 1 <= int(quality) <= 100:
        raise DataError(f"JPEG quality must be in 1..100 (or None for pass-through), got {quality}")
    if int(workers) < 0:
        raise DataError(f"workers must be >= 0 (0 = all cores), got {workers}")
    return fmt


def _make_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise DataError(f"output {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"output folder {path} is not writable")


class _DirLock:
    """An exclusive lock on ``<split dir>/.prepare.lock`` (released by the kernel if we are killed)."""

    def __init__(self, split_dir: Path) -> None:
        self.path = split_dir / LOCK_NAME
        self.fd = -1

    def __enter__(self) -> "_DirLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # a POSIX record lock, not flock: forked pool workers do not inherit it, so a killed run
            # never leaves the folder locked by its orphaned workers
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise DataError(
                f"another 'swav-fast prepare' is writing to {self.path.parent}; "
                "wait for it or choose another --out"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


class _Preparer:
    def __init__(
        self,
        source: SourceList,
        split_dir: Path,
        fmt: str,
        split: str,
        shard_size: int,
        max_resolution: int | None,
        quality: int | None,
        workers: int,
        progress: bool,
        overwrite: bool,
        page_size: int,
        subset_params: dict[str, Any] | None = None,
    ) -> None:
        self.source, self.split_dir, self.fmt, self.split = source, split_dir, fmt, split
        self.shard_size = shard_size
        self.max_resolution = None if max_resolution is None else int(max_resolution)
        self.quality = None if quality is None else int(quality)
        self.workers, self.progress, self.overwrite = int(workers), progress, overwrite
        self.page_size = page_size
        self.work = split_dir / WORK_DIR
        self.n = len(source)
        self.num_shards = -(-self.n // shard_size)
        self.params: dict[str, Any] = {
            "format": fmt,
            "split": split,
            "shard_size": shard_size,
            "max_resolution": self.max_resolution,
            "quality": self.quality,
        }
        if fmt == "beton":
            self.params["page_size"] = page_size
        self.params.update(subset_params or {})
        self.fingerprint = source.fingerprint()

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        done = self._finished_manifest()
        if done is not None:
            return done
        records = self._load_plan()
        beton = self._open_beton(records) if self.fmt == "beton" else None
        if beton is not None and not beton.resumed:
            records = {}
        todo = [k for k in range(self.num_shards) if k not in records]
        entry: dict[str, Any] | None = None
        if records:
            log.info("resuming: %d of %d shards already written", len(records), self.num_shards)
        try:
            self._write_shards(todo, records, beton)
            if beton is not None:
                entry = beton.close() if beton.num_samples else None
                beton = None
        except BaseException:
            if beton is not None:
                beton.abort()
            raise
        manifest = self._manifest(records, entry)
        write_json_atomic(self.split_dir / MANIFEST_NAME, manifest)
        shutil.rmtree(self.work, ignore_errors=True)
        return manifest

    # -- existing output -----------------------------------------------------------------------
    def _finished_manifest(self) -> dict[str, Any] | None:
        path = self.split_dir / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            old = read_manifest(self.split_dir)
        except DataError:
            old = None
        if (
            old is not None
            and old.get("params") == self.params
            and old.get("source_fingerprint") == self.fingerprint
            and self._outputs_present(old)
        ):
            log.info(
                "%s already holds this dataset (%d samples); nothing to do",
                self.split_dir,
                old["num_samples"],
            )
            shutil.rmtree(self.work, ignore_errors=True)  # left if a run was killed right after the manifest
            return old
        if not self.overwrite:
            what = (
                "an unreadable manifest"
                if old is None
                else f"a prepared {old['format']} dataset with other settings or another source"
            )
            raise DataError(
                f"{self.split_dir} already holds {what}; pass --overwrite to replace it "
                "or choose another --out"
            )
        self._remove_outputs()
        return None

    def _outputs_present(self, m: dict[str, Any]) -> bool:
        for s in m["shards"]:
            p = self.split_dir / s["path"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                return False
            if s.get("index") and not (self.split_dir / s["index"]).is_file():
                return False
        return True

    def _remove_outputs(self) -> None:
        """Delete everything a previous prepare of this split wrote (by name pattern), and its work folder."""
        pat = re.compile(rf"^{re.escape(self.split)}(-\d{{5,}}\.(tfrecord|tar|idx)|\.beton)(\.tmp)?$")
        for name in os.listdir(self.split_dir):
            if pat.match(name) or name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
                try:
                    os.unlink(self.split_dir / name)
                except OSError:
                    pass
        shutil.rmtree(self.work, ignore_errors=True)

    # -- resume state --------------------------------------------------------------------------
    def _plan(self) -> dict[str, Any]:
        return {"params": self.params, "source_fingerprint": self.fingerprint, "num_source_files": self.n}

    def _load_plan(self) -> dict[int, dict[str, Any]]:
        plan_path = self.work / "plan.json"
        try:
            with open(plan_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old != self._plan():
            if old is not None:
                log.warning(
                    "discarding an interrupted prepare in %s that used other settings", self.split_dir
                )
            self._remove_outputs()
            try:
                self.work.mkdir()
            except OSError as exc:
                raise DataError(f"cannot create {self.work}: {exc.strerror or exc}") from None
            write_json_atomic(plan_path, self._plan())
            return {}
        records: dict[int, dict[str, Any]] = {}
        for k in range(self.num_shards):
            rec = self._read_record(k)
            if rec is None:
                if self.fmt == "beton":
                    break  # the beton is sequential: only a prefix of chunks counts
                continue
            records[k] = rec
        return records

    def _record_path(self, k: int) -> Path:
        return self.work / f"shard-{k:05d}.json"

    def _read_record(self, k: int) -> dict[str, Any] | None:
        try:
            with open(self._record_path(k), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        entry = rec.get("shard")
        if self.fmt == "beton":
            try:
                rows = np.load(self.work / f"shard-{k:05d}.npz")
                rec["_meta"], rec["_alloc"] = rows["meta"].view(SAMPLE_META), rows["alloc"].view(ALLOC)
                if len(rec["_meta"]) != rec["stored"]:
                    return None
            except (OSError, ValueError, KeyError):
                return None
        elif entry is not None:
            shard, index = self.split_dir / entry["path"], self.split_dir / entry["index"]
            if not (
                shard.is_file()
                and shard.stat().st_size == entry["bytes"]
                and index.is_file()
                and index.stat().st_size == entry["index_bytes"]
            ):
                return None
        return rec

    def _open_beton(self, records: dict[int, dict[str, Any]]) -> BetonWriter:
        resume = None
        if records:
            last = records[max(records)]
            resume = (
                int(last["end"]),
                join_rows([r["_meta"] for r in records.values()], SAMPLE_META),
                join_rows([r["_alloc"] for r in records.values()], ALLOC),
            )
        return BetonWriter(
            self.split_dir / shard_name(self.split, 0, "beton"), self.n, self.page_size, resume
        )

    # -- writing -------------------------------------------------------------------------------
    def _writer(self, k: int) -> ShardWriter:
        if self.fmt == "tfrecord":
            return TFRecordShardWriter(self.split_dir, self.split, k)
        return WdsShardWriter(self.split_dir, self.split, k, key_digits(self.n))

    def _write_shards(
        self, todo: list[int], records: dict[int, dict[str, Any]], beton: BetonWriter | None
    ) -> None:
        from tqdm import tqdm

        items = [
            (i, self.source.item(i))
            for k in todo
            for i in range(k * self.shard_size, min(self.n, (k + 1) * self.shard_size))
        ]
        pause_after = _pause_after()
        stream = _encoded_stream(items, self.max_resolution, self.quality, self.workers)
        bar = tqdm(
            total=self.n,
            initial=self.n - len(items),
            unit="img",
            desc=f"prepare {self.split} ({self.fmt})",
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.05,
            bar_format=BAR_FORMAT,
        )
        labels, paths, classes = self.source.labels, self.source.paths, self.source.classes
        try:
            for done_here, k in enumerate(todo):
                lo, hi = k * self.shard_size, min(self.n, (k + 1) * self.shard_size)
                writer = beton if beton is not None else self._writer(k)
                counts = [0] * len(classes)
                bad: list[dict[str, str]] = []
                converted: list[dict[str, str]] = []
                passed = 0
                try:
                    for i in range(lo, hi):
                        r = next(stream)
                        assert r.index == i, (r.index, i)
                        if r.data is None:
                            bad.append({"path": paths[i], "reason": r.reason})
                        elif beton is not None and not beton.fits(len(r.data)):
                            bad.append(
                                {
                                    "path": paths[i],
                                    "reason": f"JPEG of {len(r.data)} bytes does not fit a "
                                    f"{beton.page_size} byte beton page (use --max-resolution)",
                                }
                            )
                        else:
                            if beton is not None:
                                beton.add(labels[i], r.data, r.width, r.height)
                            else:
                                writer.add(i, labels[i], r.data)  # type: ignore[union-attr]
                            counts[labels[i]] += 1
                            passed += r.passthrough
                            if r.note:
                                converted.append({"path": paths[i], "reason": r.note})
                        bar.update(1)
                        if (
                            pause_after is not None
                            and done_here >= pause_after
                            and i - lo + 1 == (hi - lo + 1) // 2
                        ):
                            writer.flush()  # type: ignore[union-attr]
                            _test_pause()
                except BaseException:
                    if beton is None:
                        writer.abort()  # type: ignore[union-attr]
                    raise
                rec: dict[str, Any] = {
                    "shard_id": k,
                    "counts": counts,
                    "bad": bad,
                    "converted": converted,
                    "passthrough": passed,
                    "stored": sum(counts),
                }
                if beton is not None:
                    end, meta, alloc = beton.checkpoint()
                    rec["end"] = end
                    _save_rows(self.work / f"shard-{k:05d}.npz", meta, alloc)
                    rec["_meta"], rec["_alloc"] = meta, alloc
                else:
                    w = writer
                    if w.num_samples:  # type: ignore[union-attr]
                        rec["shard"] = w.close()  # type: ignore[union-attr]
                    else:
                        w.abort()  # type: ignore[union-attr]
                        rec["shard"] = None
                write_json_atomic(
                    self._record_path(k), {key: v for key, v in rec.items() if not key.startswith("_")}
                )
                records[k] = rec
        finally:
            bar.close()
            stream.close()

    def _manifest(
        self, records: dict[int, dict[str, Any]], beton_entry: dict[str, Any] | None
    ) -> dict[str, Any]:
        classes = self.source.classes
        recs = [records[k] for k in range(self.num_shards)]
        counts = (
            np.sum([r["counts"] for r in recs], axis=0, dtype=np.int64) if recs else np.zeros(len(classes))
        )
        bad = list(self.source.bad) + [b for r in recs for b in r["bad"]]
        stored = int(sum(r["stored"] for r in recs))
        if stored == 0:
            first = f" (first: {bad[0]['path']}: {bad[0]['reason']})" if bad else ""
            raise DataError(f"no readable image in {self.source.root}: all {self.n} files are bad{first}")
        if self.fmt == "beton":
            assert beton_entry is not None
            shards = [beton_entry]
        else:
            shards = [r["shard"] for r in recs if r.get("shard")]
        passed = int(sum(r["passthrough"] for r in recs))
        manifest = {
            "format": self.fmt,
            "schema_version": SCHEMA_VERSION,
            "split": self.split,
            "num_samples": stored,
            "num_source_files": self.n,
            "classes": list(classes),
            "class_to_idx": {c: i for i, c in enumerate(classes)},
            "counts_per_class": {c: int(counts[i]) for i, c in enumerate(classes)},
            "shards": shards,
            "total_bytes": int(sum(s["bytes"] for s in shards)),
            "bad_files": bad,
            "num_passthrough": passed,
            "num_reencoded": stored - passed,
            "converted_files": [c for r in recs for c in r.get("converted", [])],
            "params": self.params,
            "source": self.source.root,
            "source_kind": self.source.kind,
            "source_fingerprint": self.fingerprint,
            "layout": LAYOUT[self.fmt],
        }
        if self.fmt == "wds":
            manifest["key_digits"] = key_digits(self.n)
        manifest.update(self.source.info)  # "labels" (validation label file), "subset"
        validate_manifest(manifest)
        return manifest


def _save_rows(path: Path, meta: np.ndarray, alloc: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        meta=np.ascontiguousarray(meta).view(np.uint8).reshape(-1),
        alloc=np.ascontiguousarray(alloc).view(np.uint8).reshape(-1),
    )
    os.replace(tmp, path)


def _pause_after() -> int | None:
    value = os.environ.get(PAUSE_ENV)
    return int(value) if value else None


def _test_pause() -> None:
    """Test-only (``SWAV_FAST_TEST_PREPARE_PAUSE``): announce and sleep so that the test can kill us here."""
    print(PAUSE_MESSAGE, file=sys.stderr, flush=True)
    time.sleep(3600)


# ----------------------------------------------------------------------------- parallel encoding
def _resolve_workers(workers: int, num_items: int) -> int:
    n = (os.cpu_count() or 1) if workers <= 0 else workers
    return max(1, min(n, -(-num_items // _CHUNK)))


class _EncodedStream:
    """Iterator over encoded images in source order; ``workers > 1`` decodes in a process pool.

    At most ``4 * workers`` chunks are in flight, so memory stays bounded when writing is slow.
    """

    def __init__(
        self,
        items: Sequence[tuple[int, ItemSpec]],
        max_resolution: int | None,
        quality: int | None,
        workers: int,
    ) -> None:
        self.chunks = [items[k:k + _CHUNK] for k in range(0, len(items), _CHUNK)]
        self.opts = (max_resolution, quality)
        self.n_workers = _resolve_workers(workers, len(items))
        self.pool = multiprocessing.get_context().Pool(self.n_workers) if self.n_workers > 1 else None
        self._it = self._iterate()

    def _iterate(self) -> Iterator[Any]:
        if self.pool is None:
            for c in self.chunks:
                yield from encode_chunk((c, *self.opts))
            return
        pending: deque = deque()
        nxt = 0
        window = 4 * self.n_workers
        while nxt < len(self.chunks) or pending:
            while nxt < len(self.chunks) and len(pending) < window:
                pending.append(self.pool.apply_async(encode_chunk, ((self.chunks[nxt], *self.opts),)))
                nxt += 1
            yield from pending.popleft().get()

    def __iter__(self) -> "_EncodedStream":
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _encoded_stream(
    items: Sequence[tuple[int, ItemSpec]], max_resolution: int | None, quality: int | None, workers: int
) -> _EncodedStream:
    return _EncodedStream(items, max_resolution, quality, workers)
