"""Shared helpers of the benchmark scripts: environment record, timing, table printing, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipelines.atomic import atomic_write


def git_commit(repo: str | os.PathLike[str] | None = None) -> str | None:
    """The checkout's commit (with ``+dirty`` when there are local changes), or None outside git."""
    cwd = os.fspath(repo) if repo is not None else str(Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, host and accelerator description for a benchmark record."""
    import torchvision

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """``(fn(), seconds)``, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header)``; floats get 3 significant figures or more."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    last = len(columns) - 1  # the last column (often a free-text note) is left-aligned, not padded

    def join(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if 0 < i < last else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [join([h for _, h in columns]), "  ".join("-" * w for w in widths)]
    out += [join(b) for b in body]
    return "\n".join(out)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`pipelines.atomic.atomic_write`: temp file in the same
    folder, fsync, rename): a reader or a kill never sees a half-written file, and the old content stays
    until the new one is complete. Results are 0644, for everyone to read."""
    return atomic_write(path, data)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON atomically (temp file in the same folder, fsync, rename)."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def parse_with_common(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add the options every device benchmark has (``--compile-backend``, ``--device``, ``--json``),
    parse ``argv`` and keep it (``args.argv``) for the JSON's ``command``."""
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", dest="json_path", help="write the results here (JSON)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def benchmark_main(argv: Sequence[str] | None, parse_args: Callable[[Sequence[str] | None], Any],
                   run: Callable[[Any], dict[str, Any]], headline: Callable[[dict[str, Any]], str],
                   columns: Sequence[tuple[str, str]],
                   after_table: Callable[[dict[str, Any], Any], None] | None = None) -> int:
    """The ``main`` of a benchmark script: parse ``argv``, ``run(args)``, print ``headline(result)``
    and the table of ``result["results"]``, then ``after_table(result, args)`` (extra lines, files
    that the JSON should name), and write the JSON when ``--json`` was given."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(headline(result))
    print(format_table(result["results"], columns))
    if after_table is not None:
        after_table(result, args)
    if args.json_path:
        print(f"wrote {write_json(args.json_path, result)}")
    return 0
