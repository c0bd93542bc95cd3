"""``swav-fast report RUN_DIR``: PNG training curves and a summary table of a run."""
from __future__ import annotations

import argparse
import json

EPILOG = """writes to RUN_DIR/report/ (or --out):
  loss.png, lr.png, images_per_s.png, loader_wait.png (when logged), knn.png (when kNN was run),
  overview.png (all curves), summary.md (the table printed here) and summary.json.
  TensorBoard scalars are written during training with train.tensorboard=true
  (pip install -e ".[tensorboard]"; tensorboard --logdir RUN_DIR/tensorboard).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot a run's training curves and summarise it",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read RUN_DIR/metrics.jsonl; write PNG plots (loss, lr, images/s, "
                                   "kNN) and a markdown summary table.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (train.output_dir)")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from swav_fast.report import write_report

    report = write_report(args.run_dir, args.out)
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    print(report.markdown)
    print(f"plots ({len(report.plots)}): " + (", ".join(report.plots) if report.plots else "none "
                                              "(no step records yet)"))
    print(f"summary: {report.out_dir}/summary.md")
    return 0
