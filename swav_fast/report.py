"""Run reports: PNG training curves and a summary table from a run folder's ``metrics.jsonl``.

:func:`write_report` (``swav-fast report RUN_DIR``) reads the records that
:class:`swav_fast.runlog.RunLog` appends and writes, to ``RUN_DIR/report/`` (each file atomically:
temp file + rename):

- ``loss.png``, ``lr.png``, ``images_per_s.png``: the ``step`` records against the step;
- ``loader_wait.png`` when step records carry ``loader_wait_fraction`` (share of the step time spent
  waiting for the loader, 0..1);
- ``knn.png`` when there are ``knn`` records: ``top1`` of periodic evaluations and
  ``trained_top1`` / ``random_init_top1`` of the end-of-training evaluation;
- ``overview.png``: all of the above on one page;
- ``summary.md`` (a markdown table) and ``summary.json``.

A resumed run may have logged some steps twice (after the last checkpoint and again after the
resume): the last record of each step wins. An unreadable line (e.g. half-written by a crash) is
skipped and counted. Plots use matplotlib's Agg canvas directly (no pyplot, no display needed).
"""
from __future__ import annotations

import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.atomic import atomic_write
from swav_fast.errors import DataError

#: Step-record fields that get their own plot: (field, file stem, axis label).
STEP_PLOTS = (("loss", "loss", "SwAV loss"), ("lr", "lr", "learning rate"),
              ("images_per_s", "images_per_s", "images / s"),
              ("loader_wait_fraction", "loader_wait", "loader wait fraction"))


@dataclass
class Report:
    run_dir: str
    out_dir: str
    summary: dict[str, Any]
    markdown: str
    plots: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- reading -----------------------------------------------------------------------------------------
def read_records(run_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """All readable records of ``run_dir/metrics.jsonl`` and the number of unreadable lines."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl (is it a swav-fast run folder?)")
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("kind"), str):
            records.append(rec)
        else:
            bad += 1
    if not records:
        raise DataError(f"{path} holds no readable records")
    return records, bad


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``step`` records sorted by step, the last record of a step kept (resumed runs)."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec["kind"] == "step" and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def series(steps: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in steps:
        if _finite(rec.get(key)):
            xs.append(rec["step"])
            ys.append(float(rec[key]))
    return xs, ys


def segments(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records of each process that wrote the run: by their ``segment`` field (or, in logs written
    before segments were numbered, split at ``resume`` records)."""
    numbered = any("segment" in r for r in records)
    out: list[list[dict[str, Any]]] = []
    last: Any = object()
    for r in records:
        key = r.get("segment") if numbered else None
        if not out or (key != last if numbered else r["kind"] == "resume"):
            out.append([])
        last = key
        out[-1].append(r)
    return out


def wall_seconds(records: list[dict[str, Any]], done: dict[str, Any] | None) -> float | None:
    """Wall time of the whole run: over every segment (first to last record; a finished segment's
    ``done`` record carries its own measured seconds)."""
    parts = segments(records)
    if len(parts) <= 1:
        return done.get("seconds") if done else None
    total = 0.0
    for part in parts:
        end = next((r for r in part if r["kind"] == "done"), None)
        times = [r["time"] for r in part if _finite(r.get("time"))]
        if end is not None and _finite(end.get("seconds")):
            total += float(end["seconds"])
        elif times:
            total += max(times) - min(times)
    return total


def summarize(records: list[dict[str, Any]], bad_lines: int = 0) -> dict[str, Any]:
    """Steps, epochs, final loss, images/s, kNN, bad images, resumes, status of a run."""
    steps = step_records(records)
    done = next((r for r in reversed(records) if r["kind"] == "done"), None)
    epochs_done = [r for r in records if r["kind"] == "epoch"]
    knn = [r for r in records if r["kind"] == "knn"]
    ips = series(steps, "images_per_s")[1]
    losses = series(steps, "loss")[1]
    out: dict[str, Any] = {
        "status": "finished" if done else "incomplete (no 'done' record)",
        "steps": done.get("steps") if done else (steps[-1]["step"] if steps else 0),
        "epochs": done.get("epochs") if done else (max(r.get("epoch", -1) for r in epochs_done) + 1
                                                   if epochs_done else 0),
        "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "mean_images_per_s": statistics.fmean(ips) if ips else None,
        "median_images_per_s": statistics.median(ips) if ips else None,
        "run_images_per_s": done.get("images_per_s") if done else None,
        "seconds": wall_seconds(records, done),
        "segments": len(segments(records)),
        "bad_images": (done or (steps[-1] if steps else {})).get("bad_images"),
        "resumes": sum(r["kind"] == "resume" for r in records),
        "logged_steps": len(steps),
        "unreadable_lines": bad_lines,
    }
    waits = series(steps, "loader_wait_fraction")[1]
    if waits:
        out["mean_loader_wait_fraction"] = statistics.fmean(waits)
    final = next((r for r in reversed(knn) if "trained_top1" in r), None)
    if final:
        out["knn_top1"] = final["trained_top1"]
        out["knn_random_init_top1"] = final.get("random_init_top1")
    periodic = [r for r in knn if _finite(r.get("top1"))]
    if periodic:
        out["knn_periodic_last_top1"] = periodic[-1]["top1"]
        out["knn_periodic_best_top1"] = max(r["top1"] for r in periodic)
    return out


_LABELS = (("status", "status", "{}"), ("steps", "steps", "{}"), ("epochs", "epochs completed", "{}"),
           ("final_loss", "final loss", "{:.4f}"), ("min_loss", "min loss", "{:.4f}"),
           ("mean_images_per_s", "mean images/s (logged windows)", "{:.1f}"),
           ("median_images_per_s", "median images/s (logged windows)", "{:.1f}"),
           ("run_images_per_s", "images/s (whole run)", "{:.1f}"), ("seconds", "wall time (s)", "{:.1f}"),
           ("mean_loader_wait_fraction", "mean loader wait fraction", "{:.3f}"),
           ("knn_top1", "kNN top-1 (%)", "{:.2f}"), ("knn_random_init_top1", "kNN top-1, random init (%)",
                                                      "{:.2f}"),
           ("knn_periodic_last_top1", "kNN top-1, last periodic (%)", "{:.2f}"),
           ("knn_periodic_best_top1", "kNN top-1, best periodic (%)", "{:.2f}"),
           ("bad_images", "unreadable images skipped", "{}"), ("resumes", "resumes", "{}"),
           ("unreadable_lines", "unreadable log lines", "{}"))


def summary_markdown(summary: dict[str, Any], title: str = "") -> str:
    """A two-column markdown table of the summary (absent or empty values shown as ``-``)."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for key, label, fmt in _LABELS:
        if key not in summary:
            continue
        v = summary[key]
        lines.append(f"| {label} | {'-' if v is None else fmt.format(v)} |")
    return "\n".join(lines) + "\n"


# -- writing -----------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """:func:`pipelines.atomic.atomic_write`, a failure reported as a DataError."""
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise DataError(f"could not write {path}: {exc.strerror or exc}") from exc


def _figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.0)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError("swav-fast report needs matplotlib: pip install 'matplotlib>=3.10,<3.11'") from exc
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _draw_step(ax, steps: list[dict[str, Any]], key: str, label: str) -> None:
    xs, ys = series(steps, key)
    ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(label)
    ax.grid(True, alpha=0.3)
    if key == "lr" and ys and min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    if key == "loader_wait_fraction":
        ax.set_ylim(0.0, 1.0)


def _draw_knn(ax, knn: list[dict[str, Any]]) -> None:
    periodic = [(r.get("step", 0), r["top1"]) for r in knn if _finite(r.get("top1"))]
    final = [r for r in knn if _finite(r.get("trained_top1"))]
    if periodic:
        ax.plot(*zip(*periodic), marker="o", label="kNN top-1 (periodic)")
    if final:
        ax.plot([r.get("step", 0) for r in final], [r["trained_top1"] for r in final], "s",
                color="tab:green", label="kNN top-1 (trained)")
        rnd = [r for r in final if _finite(r.get("random_init_top1"))]
        if rnd:
            ax.plot([r.get("step", 0) for r in rnd], [r["random_init_top1"] for r in rnd], "x",
                    color="tab:red", label="kNN top-1 (random init)")
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("kNN top-1")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Write the PNG curves and the summary of ``run_dir`` into ``out_dir`` (default ``run_dir/report``)."""
    run_dir = Path(run_dir)
    records, bad = read_records(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"report folder {out} is not writable: {exc.strerror or exc}") from exc
    steps = step_records(records)
    knn = [r for r in records if r["kind"] == "knn" and (_finite(r.get("top1"))
                                                        or _finite(r.get("trained_top1")))]
    panels: list[tuple[str, Any]] = []
    for key, stem, label in STEP_PLOTS:
        if series(steps, key)[0]:
            panels.append((stem, lambda ax, key=key, label=label: _draw_step(ax, steps, key, label)))
    if knn:
        panels.append(("knn", lambda ax: _draw_knn(ax, knn)))

    plots = []
    for stem, draw in panels:
        fig, (ax,) = _figure()
        draw(ax)
        path = out / f"{stem}.png"
        _atomic_write(path, _png(fig))
        plots.append(str(path))
    if panels:
        ncols = 2 if len(panels) > 1 else 1
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = _figure(nrows, ncols, size=(6.0 * ncols, 3.6 * nrows))
        for ax, (_, draw) in zip(axes, panels):
            draw(ax)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(run_dir.name or str(run_dir))
        path = out / "overview.png"
        _atomic_write(path, _png(fig))
        plots.append(str(path))

    summary = summarize(records, bad)
    markdown = summary_markdown(summary, f"swav-fast run {run_dir}")
    _atomic_write(out / "summary.md", markdown.encode())
    _atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return Report(str(run_dir), str(out), summary, markdown, plots)
