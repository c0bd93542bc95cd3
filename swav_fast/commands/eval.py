"""``swav-fast eval knn``: evaluate a checkpoint's frozen trunk."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (kNN)",
                       description="Evaluate the frozen trunk of a checkpoint.")
    esub = p.add_subparsers(dest="protocol", metavar="PROTOCOL")
    esub.required = True
    k = esub.add_parser("knn", help="weighted kNN top-1 (cosine, k=20, T=0.07)",
                        description="Weighted kNN: bank = DATA/train, queries = DATA/val.")
    k.add_argument("--checkpoint", required=True, help="checkpoint file (ckpt-*.pt)")
    k.add_argument("--data", required=True, help="folder with train/ and val/ ImageFolders")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--image-size", type=int, help="centre-crop size (default: the run's eval.image_size)")
    k.add_argument("--batch-size", type=int, default=128)
    k.add_argument("--workers", type=int, default=0)
    k.add_argument("--device", default="auto")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=run_knn)


def run_knn(args: argparse.Namespace) -> int:
    from swav_fast.checkpoint import load_checkpoint
    from swav_fast.config import Config, from_dict
    from swav_fast.errors import CheckpointError
    from swav_fast.eval.knn import knn_eval
    from swav_fast.train import build_model, resolve_device

    state = load_checkpoint(args.checkpoint)
    cfg = from_dict(Config, state.get("config", {}))
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{args.checkpoint}: weights do not fit model {cfg.model.arch}: "
                              f"{str(exc).splitlines()[0]}") from exc
    device = resolve_device(args.device)
    result = knn_eval(model.trunk.to(device), args.data, image_size=args.image_size or cfg.eval.image_size,
                      k=args.k, temperature=args.temperature, batch_size=args.batch_size, device=device,
                      workers=args.workers)
    out = {"checkpoint": args.checkpoint, "step": state.get("step"), **result.as_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"kNN top-1: {result.top1:.2f}% (k={result.k}, T={result.temperature}, "
              f"{result.num_train} train / {result.num_val} val images, {result.num_classes} classes)")
    return 0
