"""One way to write a file so that nothing already written is lost.

:func:`atomic_write` writes to a temp file in the destination's folder, flushes and fsyncs it, renames
it over the destination and fsyncs the folder: a reader or a kill at any moment sees either the old
complete file or the new complete one. Every writer of the project (checkpoints, manifests, reports,
prepared shards' side files, benchmark results) goes through it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_json", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: str | bytes | Callable[[IO[bytes]], None], *,
                 mode: int = 0o644, make_parents: bool = True, durable: bool = True) -> Path:
    """Write ``data`` (text, bytes, or a function that writes to a binary file) to ``path`` atomically.

    Temp file ``.NAME.*.tmp`` beside ``path``, fsync, ``os.replace``, fsync of the folder. On any error
    (including a full disk) the temp file is removed, ``path`` keeps its old content and the
    :class:`OSError` propagates for the caller to report. ``mode`` is the new file's permission bits
    (temp files are created 0600). ``durable=False`` skips the two fsyncs, for files that can be made
    again (a synthetic set's images): the rename still keeps a reader from a half-written file."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(f.fileno(), mode)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **kwargs: Any) -> Path:
    """``obj`` as indented JSON (with a final newline) through :func:`atomic_write`."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", **kwargs)
