"""Learning across seeds: kNN top-1 of each quick recipe's trained trunk vs its random init, per seed.

    python3 benchmarks/bench_learning.py [--methods swav|all|swav,simclr,...] [--seeds 0,1,2,3,4]
        [--dataset builtin,shapes] [--variant "NAME:KEY=VALUE ..." ...] [--jobs N] [--output DIR]
        [--json out.json] [KEY=VALUE ...]

(also ``swav-fast bench learning ...``). Each row is one ``swav-fast train`` run of the method's quick
recipe (``quick`` for SwAV, ``quick_<method>`` for the others) with only ``train.seed`` changed: the
config is built as the train command builds it (:func:`swav_fast.config.load_config` with the recipe and
the overrides) and run by :func:`swav_fast.train.train`, whose end-of-run kNN gives ``trained`` (the
trunk after training) and ``random init`` (the same trunk at its initialisation, which depends on the
seed too); ``gain = trained - random init`` in percentage points. The summary gives, per method and
dataset, the mean, min and max of the gain over the seeds: a recipe change is judged on its worst seed,
not on one lucky seed (issue 22: at 408 steps on a 1,100-image folder SwAV's gains were +14.3, -16.2
and +15.5 points at seeds 0, 1 and 2).

``KEY=VALUE`` overrides apply to every run after the recipe (e.g. ``optim.epochs=8`` or
``data.synthetic.cache_dir=DIR``); ``--jobs N`` runs N trainings at once in separate processes, each with
``train.threads`` = cores / N unless an override sets it. A full run costs one quick training (minutes
on 2 CPU cores) per method and seed. ``--dataset builtin`` is the built-in synthetic set the main job
trains on (``data.synthetic.*``, generated once into its cache); ``--dataset shapes`` the same sizes of
``data.synthetic.kind=shapes`` (the class is one object's shape, all colours random, so a random-init
trunk is closer to chance); ``--dataset builtin,shapes`` runs both.

``--variant "NAME:KEY=VALUE KEY=VALUE"`` (repeatable) compares recipe changes in one run: every method,
dataset and seed is trained once per variant, with the variant's overrides after the common ones
(``"recipe:"``, with none, is the recipe itself). The summary then has one line per variant, and
``vs first`` is the mean over the seeds of each seed's gain minus the first variant's gain on that seed
(same seed, same random init), so a change is judged seed by seed, not by two noisy means.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import benchmark_main, env_info, format_table
from swav_fast.config import Config, available_recipes, load_config
from swav_fast.errors import ConfigError, SwavFastError

log = logging.getLogger("benchmarks")

#: dataset name -> what it is (the overrides it needs are in :func:`dataset_overrides`)
DATASETS = {"builtin": "the built-in synthetic set of the main job (data.synthetic.*, kind photo)",
            "shapes": "the same sizes, kind shapes: the class is an object's shape, all colours random"}
COLUMNS = [("method", "method"), ("variant", "variant"), ("dataset", "dataset"), ("seed", "seed"),
           ("trained", "trained %"),
           ("random_init", "random init %"), ("gain", "gain"), ("steps", "steps"),
           ("unhealthy_checks", "collapse checks"), ("seconds", "s"),
           ("note", "note")]
SUMMARY_COLUMNS = [("method", "method"), ("variant", "variant"), ("dataset", "dataset"), ("runs", "seeds"),
                   ("mean_gain", "mean gain"),
                   ("min_gain", "min gain"), ("max_gain", "max gain"), ("worst_seed", "worst seed"),
                   ("below_random_init", "seeds below random init"), ("vs_first", "vs first")]
#: the variant name when no --variant is given: the recipe itself
RECIPE = "recipe"


def recipe_of(method: str) -> str:
    """The quick recipe of ``method``: ``quick`` (SwAV) or ``quick_<method>``."""
    return "quick" if method == "swav" else f"quick_{method}"


def quick_methods() -> list[str]:
    """Every method that has a quick recipe, SwAV first."""
    recipes = set(available_recipes())
    family = sorted(r[len("quick_"):] for r in recipes if r.startswith("quick_"))
    return (["swav"] if "quick" in recipes else []) + family


def parse_methods(text: str) -> list[str]:
    valid = quick_methods()
    if text.strip() == "all":
        return valid
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in valid]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"methods with a quick recipe: {', '.join(valid)} (or 'all')")
    return list(dict.fromkeys(names))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: integers separated by commas, e.g. 0,1,2,3,4 (got {text!r})") from None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. 0,1,2,3,4")
    return list(dict.fromkeys(seeds))


def parse_datasets(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    for name in names or [""]:
        dataset_overrides(name)
    return list(dict.fromkeys(names))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME:KEY=VALUE KEY=VALUE"`` -> ``(NAME, [overrides])`` (shell-style words after the colon)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not all(c.isalnum() or c in "._-" for c in name):
        raise ConfigError(f"--variant: expected NAME:KEY=VALUE ... (NAME of letters, digits, . _ -), got {text!r}")
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--variant {name}: expected KEY=VALUE overrides, got {' '.join(bad)}")
    return name, overrides


def parse_variants(texts: Sequence[str] | None) -> list[tuple[str, list[str]]]:
    """The ``--variant`` options (default: the recipe alone); names must differ."""
    variants = [parse_variant(t) for t in texts] if texts else [(RECIPE, [])]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant: names must differ, got {', '.join(names)}")
    return variants


def dataset_overrides(dataset: str) -> list[str]:
    """The overrides that select ``dataset`` (after the recipe, before the user's)."""
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown {dataset!r}; datasets: {', '.join(DATASETS)}")
    kind = "photo" if dataset == "builtin" else dataset
    return ["data.path=null", f"data.synthetic.kind={kind}"]  # the recipe's data.synthetic.* otherwise


def run_config(method: str, dataset: str, seed: int, overrides: Sequence[str], run_dir: Path,
               threads: int | None) -> Config:
    """The config ``swav-fast train --recipe <quick recipe> --output RUN_DIR train.seed=SEED ...`` runs."""
    extra: dict[str, Any] = {"train": {"output_dir": str(run_dir), "progress": False}}
    cfg_overrides = [*dataset_overrides(dataset), *overrides, f"train.seed={seed}"]
    if threads and not any(o.startswith("train.threads=") for o in overrides):
        cfg_overrides.append(f"train.threads={threads}")
    cfg = load_config(recipe_of(method), cfg_overrides, extra)
    if cfg.train.method != method:
        raise ConfigError(f"recipe {recipe_of(method)!r} trains {cfg.train.method!r}, not {method!r}")
    if not cfg.eval.at_end:
        raise ConfigError("eval.at_end=false: the benchmark needs the end-of-run kNN")
    return cfg


def train_one(method: str, dataset: str, seed: int, overrides: Sequence[str], run_dir: str,
              threads: int | None, variant: str = RECIPE) -> dict[str, Any]:
    """One training and its row; a run that fails (e.g. diverges) is a row with the reason."""
    from swav_fast.train import train

    row: dict[str, Any] = {"method": method, "variant": variant, "dataset": dataset, "seed": seed}
    t0 = time.perf_counter()
    try:
        result = train(run_config(method, dataset, seed, overrides, Path(run_dir), threads))
    except (RuntimeError, SwavFastError) as exc:
        if isinstance(exc, ConfigError):
            raise
        row.update(note=f"failed: {str(exc).splitlines()[0][:80]}", seconds=time.perf_counter() - t0)
        return row
    knn = result.knn
    trained, random_init = float(knn["trained_top1"]), float(knn["random_init_top1"])
    row.update(trained=trained, random_init=random_init, gain=trained - random_init, steps=result.steps,
               seconds=time.perf_counter() - t0, num_classes=int(knn["num_classes"]),
               num_train=int(knn["num_train"]), num_val=int(knn["num_val"]), **run_trace(Path(run_dir)))
    return row


def run_trace(run_dir: Path) -> dict[str, Any]:
    """What the run's log says about how it went, to tell a failing seed from a good one (issue 22):
    the loss at the end of every epoch, and the method's health checks that failed (SwAV's collapse
    signs: how many, the first step, and the signals of the first, e.g. prototypes used and the
    prediction entropy against ln K)."""
    from swav_fast.runlog import read_log

    try:
        records = read_log(run_dir)
    except (OSError, ValueError):
        return {}
    epoch_loss = [None if r.get("loss") is None else round(float(r["loss"]), 4)
                  for r in records if r.get("kind") == "epoch"]
    unhealthy = [r for r in records if r.get("kind") == "collapse"]
    trace: dict[str, Any] = {"epoch_loss": epoch_loss, "unhealthy_checks": len(unhealthy)}
    if unhealthy:
        first = unhealthy[0]
        trace["first_unhealthy"] = {k: v for k, v in first.items() if k not in ("kind", "time", "remedies")}
    return trace


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, variant, dataset): mean, min, max of the gain over the seeds that finished, the worst
    seed, how many seeds ended below their random init, and (``vs_first``, variants after the first) the
    mean over the seeds both finished of this variant's gain minus the first variant's."""
    out = []
    first = rows[0].get("variant", RECIPE) if rows else RECIPE
    gain_of = {(r["method"], r.get("variant", RECIPE), r["dataset"], r["seed"]): r["gain"]
               for r in rows if r.get("gain") is not None}
    for key in dict.fromkeys((r["method"], r.get("variant", RECIPE), r["dataset"]) for r in rows):
        group = [r for r in rows if (r["method"], r.get("variant", RECIPE), r["dataset"]) == key]
        done = [r for r in group if r.get("gain") is not None]
        entry: dict[str, Any] = {"method": key[0], "variant": key[1], "dataset": key[2], "runs": len(done),
                                 "failed": len(group) - len(done)}
        if done:
            gains = [r["gain"] for r in done]
            worst = min(done, key=lambda r: r["gain"])
            entry.update(mean_gain=statistics.fmean(gains), min_gain=min(gains), max_gain=max(gains),
                         worst_seed=worst["seed"], below_random_init=sum(g < 0 for g in gains))
            if key[1] != first:
                paired = [r["gain"] - gain_of[(key[0], first, key[2], r["seed"])] for r in done
                          if (key[0], first, key[2], r["seed"]) in gain_of]
                entry["vs_first"] = statistics.fmean(paired) if paired else None
        out.append(entry)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swav-fast bench learning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every run, after the recipe (e.g. optim.epochs=8)")
    p.add_argument("--methods", default="swav",
                   help="comma-separated methods, or 'all' (every quick recipe: "
                        f"{', '.join(quick_methods())}); default swav")
    p.add_argument("--seeds", default="0,1,2,3,4",
                   help="comma-separated train.seed values (default 0,1,2,3,4)")
    p.add_argument("--dataset", default="builtin",
                   help="comma-separated datasets (default builtin): "
                        + "; ".join(f"{k}: {v}" for k, v in DATASETS.items()))
    p.add_argument("--variant", action="append", dest="variants", metavar="NAME:KEY=VALUE ...",
                   help="a recipe change to compare (repeatable; the first is the reference, "
                        "'recipe:' the recipe itself); default: the recipe alone")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, in separate processes (default 1)")
    p.add_argument("--output", help="keep the run folders here (default: a temporary folder, removed after)")
    p.add_argument("--json", dest="json_path", help="write the results here (JSON)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"expected KEY=VALUE overrides, got {' '.join(bad)}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (got {args.jobs})")
    args.variant_list = parse_variants(args.variants)
    return args


def prepare_dataset(method: str, dataset: str, overrides: Sequence[str], scratch: Path) -> None:
    """Generate the built-in set once, before parallel runs would each start generating it."""
    from swav_fast.run import synthetic_root

    cfg = run_config(method, dataset, 0, overrides, scratch / "prepare", None)
    if cfg.data.path is None:
        synthetic_root(cfg)


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    datasets = parse_datasets(args.dataset)  # refuse an unknown dataset before any work
    started = time.perf_counter()
    variants = args.variant_list
    jobs = min(args.jobs, len(methods) * len(datasets) * len(seeds) * len(variants))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        root = Path(args.output) if args.output else Path(tmp)
        for dataset in datasets:
            for _, extra in variants:  # a variant may change data.synthetic.*
                prepare_dataset(methods[0], dataset, [*args.overrides, *extra], Path(tmp))
        named = variants != [(RECIPE, [])]  # run folders keep their old names without --variant
        specs = [(m, d, s, [*args.overrides, *extra],
                  str(root / (f"{m}-{v}-{d}-seed{s}" if named else f"{m}-{d}-seed{s}")), threads, v)
                 for m in methods for v, extra in variants for d in datasets for s in seeds]
        if jobs == 1:
            rows = [train_one(*spec) for spec in specs]
        else:  # spawn: no forked torch/loader state; each process imports the library afresh
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                rows = list(pool.map(train_one, *zip(*specs)))
    return {
        "benchmark": "learning", "env": env_info("cpu"), "seconds": time.perf_counter() - started,
        "command": "python3 benchmarks/bench_learning.py " + shlex.join(args.argv),
        "config": {"methods": methods, "seeds": seeds, "datasets": datasets, "jobs": jobs,
                   "overrides": list(args.overrides), "recipes": {m: recipe_of(m) for m in methods},
                   "variants": {v: extra for v, extra in variants}},
        "results": rows, "summary": summarise(rows),
    }


def headline(result: dict[str, Any]) -> str:
    cfg = result["config"]
    extra = f", overrides {' '.join(cfg['overrides'])}" if cfg["overrides"] else ""
    if list(cfg.get("variants", {})) != [RECIPE]:
        extra += ", variants " + "; ".join(f"{v}: {' '.join(o) or '(the recipe)'}" for v, o in cfg["variants"].items())
    return (f"learning across seeds: kNN top-1 of the quick recipes' trunks, trained vs random init "
            f"(gain in points), datasets {','.join(cfg['datasets'])}, "
            f"seeds {','.join(map(str, cfg['seeds']))}{extra}; "
            f"{result['seconds']:.0f} s")


def after_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    print("\nper method, over the seeds:")
    print(format_table(result["summary"], SUMMARY_COLUMNS))


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(argv, parse_args, run, headline, COLUMNS, after_table)


if __name__ == "__main__":
    sys.exit(main())
