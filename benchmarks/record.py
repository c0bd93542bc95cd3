"""Turn a ``swav-fast bench all`` output folder into a ``benchmarks/RESULTS.md`` entry: no hand pasting.

    python3 benchmarks/record.py DIR [--results benchmarks/RESULTS.md] [--print]

(also ``swav-fast bench record DIR``). The entry gives the device, date, commit, Python / torch /
torchvision / CUDA / DALI versions, the exact command, the part table of ``summary.txt``, the
bottleneck lines, and one Markdown table per benchmark (from the JSON files in ``check.tar.gz``). It
is appended to the end of the file (the ``## Results`` section), or replaces the entry of the same
run if that was recorded before. The file is rewritten atomically.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tarfile
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swav_fast.errors import ConfigError  # noqa: E402 - light: no torch

REPO = Path(__file__).resolve().parent.parent
MARK = "<!-- swav-fast-check run {run_id} -->"
#: part -> benchmark module whose COLUMNS give the table
BENCH_MODULES = {"bench-step": "bench_step", "bench-sinkhorn": "bench_sinkhorn", "bench-e2e": "bench_e2e",
                 "bench-loader": "bench_loader", "bench-decode": "bench_decode", "bench-methods": "bench_methods"}


def cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; columns that are empty in every row are left out."""
    used = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in used) + " |" for r in rows]
    return "\n".join(lines)


def load_folder(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(summary, {part: its benchmark JSON})`` of a ``bench all`` output folder."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: no readable summary.json (is it a 'swav-fast bench all' output "
                          f"folder?): {exc}") from None
    benches: dict[str, dict[str, Any]] = {}
    tar_path = folder / "check.tar.gz"
    if tar_path.exists():
        try:
            with tarfile.open(tar_path, "r:gz") as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if member.isfile() and name.parent.name == "json" and name.stem in BENCH_MODULES:
                        f = tar.extractfile(member)
                        if f is not None:
                            benches[name.stem] = json.loads(f.read())
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise ConfigError(f"{tar_path}: not a readable tarball of the check: {exc}") from None
    return summary, benches


def entry(summary: dict[str, Any], benches: dict[str, dict[str, Any]]) -> str:
    env = summary.get("env", {})
    device = (f"{env['gpu']} ({env.get('gpu_memory_gib')} GiB)" if env.get("gpu")
              else summary.get("device_name", summary.get("device", "?")))
    if env.get("nvidia_smi"):
        device += f"; nvidia-smi: {env['nvidia_smi']}"
    software = [f"Python {env.get('python', '?')}", f"torch {summary.get('torch', env.get('torch', '?'))}",
                f"torchvision {env.get('torchvision', '?')}"]
    if env.get("cuda"):
        software.append(f"CUDA {env['cuda']}")
    software.append(f"DALI {env['dali']}" if env.get("dali") else f"no DALI ({summary.get('dali', '?')})")
    skipped = [p["name"] for p in summary["parts"] if p["status"] == "skipped"]
    title = "dry run (tiny sizes, CPU)" if summary.get("tiny") else "GPU check"
    lines = [f"### bench all: {title} on {summary.get('device_name', '?')}, {summary['started_utc'][:10]}",
             MARK.format(run_id=summary["run_id"]),
             f"- device: {device}",
             f"- date: {summary['started_utc']}",
             f"- commit: {summary.get('commit') or 'unknown'}"
             + (" (+dirty: local changes were present)" if "+dirty" in (summary.get("commit") or "") else ""),
             f"- software: {', '.join(software)}",
             f"- command: `{summary['command']}`",
             f"- budget: {summary['budget_s']:.0f} s, used {summary['used_s']:.0f} s"
             + (f"; skipped: {', '.join(skipped)}" if skipped else ""),
             "",
             md_table([{**p, "seconds": p.get("seconds"), "what": p.get("headline") or p.get("reason")}
                       for p in summary["parts"]],
                      [("name", "part"), ("status", "status"), ("seconds", "s"), ("what", "headline")])]
    if summary.get("verdict"):
        lines += ["", *[f"- {v}" for v in summary["verdict"]]]
    for part, data in sorted(benches.items(), key=lambda kv: list(BENCH_MODULES).index(kv[0])):
        columns = importlib.import_module(f"benchmarks.{BENCH_MODULES[part]}").COLUMNS
        lines += ["", f"{part}: `{data.get('command', '?')}`", "", md_table(data.get("results", []), columns)]
    return "\n".join(lines) + "\n"


def record(folder: Path, results: Path) -> tuple[str, bool]:
    """Add (or replace) the entry of ``folder``'s run in ``results``; ``(entry, replaced)``."""
    from benchmarks.common import write_atomic

    summary, benches = load_folder(folder)
    text = entry(summary, benches)
    try:
        old = results.read_text()
    except OSError as exc:
        raise ConfigError(f"{results}: cannot read it: {exc}") from None
    mark = MARK.format(run_id=summary["run_id"])
    replaced = mark in old
    if replaced:  # from the heading above the mark to the next entry's heading (or the end)
        at = old.index(mark)
        start = old.rfind("\n### ", 0, at) + 1
        nxt = old.find("\n### ", at)
        tail = old[nxt + 1:] if nxt >= 0 else ""
        new = old[:start] + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    write_atomic(results, new)
    return text, replaced


def main(argv: Sequence[str] | None = None, prog: str = "python3 benchmarks/record.py") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the output folder of 'swav-fast bench all' (summary.json, check.tar.gz)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"),
                   help="the Markdown file to add the entry to (default benchmarks/RESULTS.md)")
    p.add_argument("--print", action="store_true", help="also print the entry")
    args = p.parse_args(argv)
    text, replaced = record(Path(args.folder), Path(args.results))
    if args.print:
        print(text, end="")
    print(f"{'replaced' if replaced else 'added'} the entry of {args.folder} in {args.results}")
    return 0


if __name__ == "__main__":
    from benchmarks.gpu_check import run_script

    run_script(main)
