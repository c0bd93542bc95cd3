"""``swav-fast train``: pretraining from a recipe, flags and ``section.key=value`` overrides."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
from typing import Callable

from swav_fast.config import available_recipes, describe_keys, load_config
from swav_fast.methods.configs import METHOD_SECTIONS
from swav_fast.step_modes import STEP_MODES

#: the registered method names (``swav_fast.methods.available_methods()``), known without importing torch
METHOD_NAMES = sorted(METHOD_SECTIONS)

EPILOG = """examples:
  swav-fast train                                  # short CPU run on the built-in synthetic data
  swav-fast train --recipe swav_400ep_bs256 --data /data/imagenet/train --output runs/r50
  swav-fast train --recipe quick optim.base_lr=0.3 methods.swav.queue_length=0
  swav-fast train --data D eval.at_end=false --no-progress train.log_every=1   # KEY=VALUE anywhere
  swav-fast train --output runs/r50 --resume auto  # continue after a crash or preemption
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model (SwAV)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain with SwAV. Without --data, uses the built-in synthetic "
                                   "dataset (generated once into a cache folder).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides such as optim.base_lr=0.6, anywhere on the line (see --list-keys)")
    p.add_argument("--recipe", default="quick",
                   help=f"recipe name or YAML path (default: quick); names: {', '.join(available_recipes())}")
    p.add_argument("--data", help="training ImageFolder (default: built-in synthetic dataset)")
    p.add_argument("--output", help="run folder (train.output_dir)")
    p.add_argument("--epochs", type=int, help="optim.epochs")
    p.add_argument("--batch-size", type=int, help="optim.batch_size (per process)")
    p.add_argument("--arch", metavar="TRUNK", type=registered(trunk_names, "trunk"),
                   help="model.arch (a registered trunk), e.g. resnet18, resnet50, resnet50w2")
    p.add_argument("--loader", metavar="BACKEND", type=registered(loader_names, "loader backend"),
                   help=f"data.loader backend; installed here: {', '.join(installed_loaders())} (pil is "
                        "the reference)")
    p.add_argument("--workers", type=int, help="data.workers")
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--method", choices=METHOD_NAMES,
                   help="train.method (default swav); each method's settings are under methods.<name>.*")
    p.add_argument("--step-mode", choices=STEP_MODES.names(),
                   help="train.step_mode: eager | compile (torch.compile + fused Sinkhorn/loss) | graph "
                        "(CUDA-graph-captured step; falls back to compile where impossible, the log says why)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (schedule unchanged)")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="'auto' (newest valid checkpoint in the run folder) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that already holds one: the previous run's "
                        "config.yaml, metrics.jsonl, checkpoints/ and tensorboard/ are moved to "
                        "OUTPUT/replaced-<UTC time>/ (nothing is deleted); without it (or --resume) such a "
                        "folder is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-keys", action="store_true",
                   help="print every config key with its type, default and description, and exit")
    p.set_defaults(func=run)


def trunk_names() -> list[str]:
    from swav_fast.models.trunks import TRUNKS  # torchvision: only once --arch is given

    return TRUNKS.names()


def loader_names() -> list[str]:
    from pipelines.loader import available_backends  # torch: only once --loader is given

    return available_backends()


def registered(names: Callable[[], list[str]], kind: str) -> Callable[[str], str]:
    """argparse ``type=`` for a name that must be registered: the registry (``names()``) is read when
    the option is given, so that ``--help`` stays light; an unknown name exits 2 listing the valid ones."""

    def check(value: str) -> str:
        valid = names()
        if value not in valid:
            raise argparse.ArgumentTypeError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
        return value

    check.__name__ = kind  # argparse names the type in its messages
    return check


#: loader backend -> the module it needs (found with importlib.util.find_spec, not imported)
LOADER_MODULES = {"pil": "PIL", "torch": "torchvision", "dali": "nvidia.dali", "ffcv": "ffcv"}


def installed_loaders() -> list[str]:
    """The ``--loader`` backends whose library is installed (checked without importing it)."""
    out = []
    for name, module in LOADER_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a missing parent package
            found = False
        if found:
            out.append(name)
    return out


def list_keys() -> str:
    """``--list-keys``: one line per key: name, type, default, description."""
    keys = describe_keys()
    width = max(len(k.key) for k in keys)
    head = f"{'key':<{width}} {'type':<12} {'default':<14} description"
    return "\n".join([head] + [k.line(width) for k in keys])


FLAG_KEYS = {"data": ("data", "path"), "output": ("train", "output_dir"), "epochs": ("optim", "epochs"),
             "batch_size": ("optim", "batch_size"), "arch": ("model", "arch"), "loader": ("data", "loader"),
             "workers": ("data", "workers"), "device": ("train", "device"),
             "max_steps": ("train", "max_steps"), "method": ("train", "method"),
             "step_mode": ("train", "step_mode")}


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print(list_keys())
        return 0
    extra: dict = {}
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            extra.setdefault(section, {})[key] = value
    if args.no_progress:
        extra.setdefault("train", {})["progress"] = False
    cfg = load_config(args.recipe, args.overrides, extra)
    from swav_fast.runinfo import knn_plan, knn_result_line, learning_hint  # torch: only once the config is read
    from swav_fast.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not result.is_main:  # under torchrun only rank 0 reports
        return 128 + result.signal if result.signal else 0
    print(f"run folder: {result.run_dir}")
    loss = (f"last loss {result.last_loss:.4f}" if math.isfinite(result.last_loss)
            else "no finite loss logged (train.log_every)")
    print(f"trained {result.steps} steps ({result.epochs} epochs) in {result.seconds:.1f} s, "
          f"{result.images_per_s:.1f} images/s, {loss}")
    if result.bad_images:
        print(f"skipped {result.bad_images} unreadable image(s); see the log for their paths")
    if result.nonfinite_steps:
        print(f"skipped {result.nonfinite_steps} step(s) with a NaN/inf loss; see metrics.jsonl")
    if result.signal:
        print(f"stopped by signal {result.signal} after writing a checkpoint; continue with --resume auto")
        return 128 + result.signal  # the shell's code for death by this signal (143 TERM, 130 INT)
    if result.knn:
        print(knn_result_line(result.knn))
        hint = learning_hint(result.knn)
        if hint:
            print(hint)
    elif cfg.eval.at_end and cfg.data.path and not cfg.eval.knn_data:
        print("end-of-run kNN " + knn_plan(True, None, True))
    return 0
