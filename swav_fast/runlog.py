"""Run logging: JSON lines (one record per line, appended and flushed) and optional TensorBoard."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("swav_fast")


def count_segments(path: Path) -> int:
    """How many segments (one per process that trained the run: a start and each resume) ``path``
    holds; a log written before segments were numbered counts as one."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    marked = text.count('"kind": "start"')
    return marked if marked else int(bool(text.strip()))


class RunLog:
    """Appends ``{"kind": ..., "time": ..., "segment": N, **fields}`` records to ``run_dir/metrics.jsonl``.

    ``segment`` numbers the processes that wrote the run (0 = the first; each ``--resume`` adds one; a
    ``start`` record opens each). A resumed segment repeats the steps between the checkpoint it resumed
    from and the point where the previous segment stopped: for a step logged twice, the record of the
    later segment is the one that counts.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.segment = count_segments(self.path) if enabled else 0
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise ImportError("train.tensorboard=true needs the 'tensorboard' extra: "
                                  "pip install 'swav-fast[tensorboard]'") from exc
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3), "segment": self.segment, **fields}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk must not kill the run; checkpoints report their own errors
            log.warning("could not append a %r record to %s: %s", kind, self.path, exc.strerror or exc)
        if self._tb is not None and "step" in fields:
            for key, value in fields.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, fields["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
