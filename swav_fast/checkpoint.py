"""Atomic, verified, safe checkpoints.

Writing: ``torch.save`` through :func:`pipelines.atomic.atomic_write` (temp file in the same folder,
fsync, rename, fsync of the folder), with a SHA-256 sidecar (``ckpt-N.pt.sha256``, ``sha256sum -c``
format) written the same way and put in place just before the checkpoint's rename; a run
killed at any moment leaves either the previous file or the complete new one, never a half-written
file under a checkpoint name. Loading: the sidecar digest (when there is one) is checked, then
``torch.load(path, weights_only=True)``, then the digest of the content stored inside the file
(``state_sha256``; checkpoints written before it existed load without it).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled objects), so
``weights_only`` can read it and a file that tries to run code is refused.
"""
from __future__ import annotations

import hashlib
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from pipelines.atomic import atomic_write
from swav_fast import faults
from swav_fast.errors import CheckpointError

CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")
DIGEST_SUFFIX = ".sha256"
#: Temp files of an unfinished write (``mkstemp(prefix=".NAME.", suffix=".tmp")``).
TEMP_RE = re.compile(r"^\.ckpt-\d{9}\.pt\..+\.tmp$")


#: Key of the digest of a checkpoint's own content, stored inside it (:func:`state_digest`).
INNER_DIGEST_KEY = "state_sha256"


def _hash_into(h: Any, obj: Any) -> None:
    """Feed ``obj`` (tensors, numbers, strings, bytes, None, lists/tuples and dicts of them) to ``h``:
    types, keys in order, tensor dtype/shape and raw bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _hash_into(h, k)
            _hash_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _hash_into(h, v)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B%d:" % len(obj) + bytes(obj))
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (everything but the digest itself): kept inside the file, so
    flipped bytes are caught on load even without the ``.sha256`` sidecar."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in state.items() if k != INNER_DIGEST_KEY})
    return h.hexdigest()


class _HashingWriter:
    """A write-only file wrapper that hashes what goes through it (one pass, no second read)."""

    def __init__(self, f: IO[bytes], digest: Any):
        self.f = f
        self.digest = digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def digest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind ``exc`` (itself, or its cause/context chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_save(obj: Any, path: str | Path, *, checksum: bool = False) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    With ``checksum``, a dict gets the digest of its content inside (:func:`state_digest`) and a
    ``path.sha256`` sidecar is written (atomically, before the rename) and
    :func:`load_checkpoint` verifies it. On any failure (full disk, read-only folder) the temp files
    are removed and the previous file at ``path`` is left as it was; a :class:`CheckpointError`
    names the path and the cause.
    """
    path = Path(path)
    if checksum and isinstance(obj, dict):
        obj = {**obj, INNER_DIGEST_KEY: state_digest(obj)}
    sidecar = {"new": False}  # a new sidecar is in place but the checkpoint is not (yet)

    def write(f: IO[bytes]) -> None:
        digest = hashlib.sha256()
        torch.save(obj, _HashingWriter(f, digest))
        faults.pause_in_checkpoint_write()  # testing only: a window for a kill before the rename
        if checksum:  # the sidecar goes in place first, then the checkpoint (atomic_write's rename)
            atomic_write(digest_path(path), f"{digest.hexdigest()}  {path.name}\n")
            sidecar["new"] = True

    try:
        atomic_write(path, write)
        sidecar["new"] = False
    except (OSError, RuntimeError) as exc:  # torch.save turns a failed write into a RuntimeError
        cause = _os_error(exc)
        reason = (cause.strerror or str(cause)) if cause is not None else str(exc).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; "
                              "the previous checkpoint is unchanged") from exc
    finally:
        if sidecar["new"]:  # it would not match the file left at ``path`` (if any)
            digest_path(path).unlink(missing_ok=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_digest(path: str | Path) -> bool:
    """Check ``path`` against its ``.sha256`` sidecar; False when there is none, raises on mismatch."""
    path = Path(path)
    sidecar = digest_path(path)
    if not sidecar.is_file():
        return False
    try:
        expected = sidecar.read_text().split()[0].lower()
        actual = file_sha256(path)
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable checksum file {sidecar.name} ({exc})") from exc
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 {actual[:12]}... does not match "
                              f"{sidecar.name} ({expected[:12]}...)")
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the sidecar digest (if any), load with ``weights_only=True``.

    Foreign, truncated, corrupt or unsafe files raise :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_digest(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch checkpoint: not a zip archive")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain "
                              f"data (weights_only load failed: {str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # noqa: BLE001 - whatever a damaged archive makes the reader raise
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch checkpoint: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a swav-fast checkpoint (no 'model' entry)")
    inner = obj.get(INNER_DIGEST_KEY)  # absent in checkpoints of older versions: they still load
    if inner is not None and state_digest(obj) != inner:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match the digest stored "
                              f"inside it ({str(inner)[:12]}...)")
    return obj


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:09d}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's name (``ckpt-000000042.pt`` -> 42)."""
    m = CKPT_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"not a checkpoint name: {path}")
    return int(m[1])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_RE.match(p.name))


def latest_valid_checkpoint(run_dir: str | Path, log=print) -> tuple[Path, dict] | None:
    """Newest checkpoint of the run that loads; unloadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log(f"skipping unusable checkpoint: {exc}")
    return None


def move_checkpoints_above(run_dir: str | Path, step: int, folder: str) -> tuple[int, Path]:
    """Move the checkpoints numbered above ``step`` (with their sidecars) to ``checkpoints/<folder>/``,
    out of reach of ``--resume auto`` and pruning; returns how many and where."""
    newer = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    aside = Path(run_dir) / "checkpoints" / folder
    if newer:
        aside.mkdir(exist_ok=True)
    for p in newer:
        for f in (p, digest_path(p)):
            if f.exists():
                f.replace(aside / f.name)
    return len(newer), aside


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and its digest sidecar."""
    Path(path).unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        remove_checkpoint(path)


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what an interrupted write left behind: temp files and sidecars without a checkpoint."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        orphan = p.name.endswith(DIGEST_SUFFIX) and not p.with_name(p.name[:-len(DIGEST_SUFFIX)]).exists()
        if TEMP_RE.match(p.name) or (orphan and CKPT_RE.match(p.name[:-len(DIGEST_SUFFIX)])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain data (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
