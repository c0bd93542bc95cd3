"""``swav-fast bench NAME [args...]``: run ``benchmarks/bench_NAME.py`` (its ``--help`` lists the args);
``bench all`` runs ``benchmarks/gpu_check.py`` (every part inside a time budget) and ``bench record DIR``
``benchmarks/record.py`` (its output folder -> ``benchmarks/RESULTS.md``)."""
from __future__ import annotations

import argparse
import importlib

from swav_fast.errors import ConfigError

#: benchmark name -> what it measures (module ``benchmarks.bench_<name>``, imported when run)
BENCHMARKS = {
    "step": "training-step images/s per step mode, arch and batch (synthetic on-device crops)",
    "methods": "training-step images/s of every method of the family on the same trunk and crops",
    "sinkhorn": "Sinkhorn (+ loss) time per call per implementation against the bytes-moved floor",
    "e2e": "real loader + step: images/s and the split between loader wait and compute",
    "loader": "loader throughput per backend and stage (read, decode, augment)",
    "decode": "JPEG decode images/s of torchcodec, torchvision.io, nvimgcodec and PIL on the same JPEGs",
    "prepare": "dataset preparation (shard writing) throughput",
    "threads": "CPU training-step images/s of the main job's model at 1, 2 and the auto-chosen threads",
    "learning": "kNN top-1 of each quick recipe's trunk vs its random init per train.seed, and the spread",
    "all": "every GPU test and benchmark in priority order inside a time budget (--dry-run: tiny, CPU)",
    "record": "turn a 'bench all' output folder into a benchmarks/RESULTS.md entry",
}
#: names whose module is not ``benchmarks.bench_<name>``
MODULES = {"all": "gpu_check", "record": "record"}
#: how each module's main names itself in its usage and in the command it records
PROGS = {"all": "swav-fast bench all", "record": "swav-fast bench record"}

EPILOG = "benchmarks:\n" + "\n".join(f"  {name:<9} {what}" for name, what in BENCHMARKS.items()) + """

Each prints a table and, with --json PATH, writes the results (device, date, commit, command).
Arguments after NAME go to the benchmark: swav-fast bench step --help
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=f"run a benchmark ({', '.join(BENCHMARKS)})", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run one of the benchmark scripts in benchmarks/.")
    p.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see its --help)")
    p.set_defaults(func=run)


def load(name: str):
    """The ``main(argv)`` of ``benchmarks.bench_<name>``."""
    file = MODULES.get(name, f"bench_{name}")
    module_name = f"benchmarks.{file}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (module_name, "benchmarks"):
            raise ConfigError(f"benchmark {name!r} is not available in this installation "
                              f"(benchmarks/{file}.py is missing)") from exc
        raise
    if name in PROGS:
        return lambda argv: module.main(argv, prog=PROGS[name])
    return module.main


def run(args: argparse.Namespace) -> int:
    return int(load(args.name)(list(args.args)) or 0)
