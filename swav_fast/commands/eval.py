"""``swav-fast eval knn|linear``: evaluate a checkpoint's frozen trunk."""
from __future__ import annotations

import argparse
import json

LINEAR_EPILOG = """protocol (defaults = the SwAV paper's linear evaluation):
  SGD momentum 0.9, lr 0.3 per 256 images (scaled linearly with --batch-size), cosine to 0,
  weight decay 1e-6, batch 256, 100 epochs (--fast: 10). The classifier trains on features
  extracted once from centre crops (no augmentation), standardised with the training mean/std.
  --cache-dir keeps the features (keyed by trunk weights, data files and image size), so a second
  run on the same checkpoint and data skips extraction.

examples:
  swav-fast eval linear --checkpoint runs/r50/checkpoints/ckpt-000500400.pt --data /data/in100
  swav-fast eval linear --checkpoint C --data D --fast --cache-dir ~/.cache/swav-fast/features --json
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file (ckpt-*.pt, or an imported one)")
    p.add_argument("--data", required=True,
                   help="folder with train/ and val/: ImageFolders or splits prepared by swav-fast prepare "
                        "(tfrecord, wds, beton), e.g. the --out of prepare")
    p.add_argument("--image-size", type=int, help="centre-crop size (default: the run's eval.image_size)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (kNN, linear probe)",
                       description="Evaluate the frozen trunk of a checkpoint.")
    esub = p.add_subparsers(dest="protocol", metavar="PROTOCOL")
    esub.required = True
    k = esub.add_parser("knn", help="weighted kNN top-1 (cosine, k=20, T=0.07)",
                        description="Weighted kNN: bank = DATA/train, queries = DATA/val.")
    _common(k)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--batch-size", type=int, default=128)
    k.set_defaults(func=run_knn)

    lin = esub.add_parser("linear", help="linear probe top-1/top-5 on frozen features",
                          epilog=LINEAR_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Linear classifier on frozen trunk features: trained on DATA/train, "
                                      "top-1/top-5 on DATA/val.")
    _common(lin)
    lin.add_argument("--epochs", type=int, default=100, help="training epochs (default 100, the paper's)")
    lin.add_argument("--fast", action="store_true", help="10 epochs instead of --epochs")
    lin.add_argument("--lr", type=float, default=0.3, help="learning rate per 256 images (default 0.3)")
    lin.add_argument("--batch-size", type=int, default=256, help="classifier batch size (default 256)")
    lin.add_argument("--weight-decay", type=float, default=1e-6, help="default 1e-6 (the paper's)")
    lin.add_argument("--momentum", type=float, default=0.9)
    lin.add_argument("--no-standardize", action="store_true",
                     help="train on the L2-normalised features as they are (no mean/std standardisation)")
    lin.add_argument("--feature-batch-size", type=int, default=128, help="batch size of feature extraction")
    lin.add_argument("--cache-dir", help="cache extracted features in this folder (off by default)")
    lin.add_argument("--seed", type=int, default=0, help="seed of the classifier's batch order")
    lin.set_defaults(func=run_linear)


def load_trunk(path: str, device_name: str):
    """(trunk on device, checkpoint dict, config, device) of a swav-fast checkpoint."""
    from swav_fast.checkpoint import load_checkpoint
    from swav_fast.config import Config, from_dict
    from swav_fast.errors import CheckpointError
    from swav_fast.run import build_model, resolve_device

    state = load_checkpoint(path)
    cfg = from_dict(Config, state.get("config", {}))
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model.arch}: "
                              f"{str(exc).splitlines()[0]}") from exc
    device = resolve_device(device_name)
    return model.trunk.to(device), state, cfg, device


def _emit(args: argparse.Namespace, state: dict, result, text: str) -> int:
    """Print the result as one JSON object (``--json``) or as the human-readable ``text``."""
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "step": state.get("step"), **result.as_dict()}))
    else:
        print(text)
    return 0


def run_knn(args: argparse.Namespace) -> int:
    from swav_fast.eval.knn import knn_eval

    trunk, state, cfg, device = load_trunk(args.checkpoint, args.device)
    result = knn_eval(trunk, args.data, image_size=args.image_size or cfg.eval.image_size,
                      k=args.k, temperature=args.temperature, batch_size=args.batch_size, device=device,
                      workers=args.workers, progress=not args.no_progress)
    return _emit(args, state, result,
                 f"kNN top-1: {result.top1:.2f}% (k={result.k}, T={result.temperature}, "
                 f"{result.num_train} train / {result.num_val} val images, {result.num_classes} classes)")


def run_linear(args: argparse.Namespace) -> int:
    from swav_fast.errors import ConfigError
    from swav_fast.eval.linear import linear_probe

    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ConfigError("--epochs and --batch-size must be >= 1 and --lr > 0")
    trunk, state, cfg, device = load_trunk(args.checkpoint, args.device)
    result = linear_probe(trunk, args.data, image_size=args.image_size or cfg.eval.image_size,
                          epochs=args.epochs, fast=args.fast, lr=args.lr, batch_size=args.batch_size,
                          weight_decay=args.weight_decay, momentum=args.momentum,
                          standardize_features=not args.no_standardize, seed=args.seed,
                          feature_batch_size=args.feature_batch_size, device=device, workers=args.workers,
                          cache_dir=args.cache_dir, progress=not args.no_progress)
    return _emit(args, state, result,
                 f"linear probe: top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}% "
                 f"({result.epochs} epochs, lr {result.lr:g}, batch {result.batch_size}; "
                 f"{result.num_train} train / {result.num_val} val images, {result.num_classes} classes; "
                 f"features {'from cache' if result.features_cached else 'extracted'} in "
                 f"{result.extract_seconds:.1f} s, classifier {result.train_seconds:.1f} s)")
