"""``swav-fast export``: trunk weights for torchvision/timm; import of official SwAV checkpoints."""
from __future__ import annotations

import argparse
import json

EPILOG = """examples:
  swav-fast export --checkpoint runs/r50/checkpoints/ckpt-000500400.pt --to torchvision r50.pt
      then: torchvision.models.resnet50().load_state_dict(torch.load("r50.pt", weights_only=True))
  swav-fast export --checkpoint C --to timm --no-fc r50_timm.pt
      then: timm.create_model("resnet50").load_state_dict(torch.load(...), strict=False)
  swav-fast export --from-official swav_800ep_pretrain.pth.tar swav800.pt
      then: swav-fast eval knn --checkpoint swav800.pt --data /data/imagenet-subset

notes:
  The exported state dict has no 'trunk.' prefix. Unless --no-fc is given it includes an UNTRAINED,
  all-zero classifier fc.weight [NUM_CLASSES, D] / fc.bias so that a strict load_state_dict works.
  timm's ResNets use torchvision's parameter names, so --to timm writes the same layout (timm is not
  needed to export). Exportable archs: resnet18/34/50/101/152, wide_resnet50_2; the main job's
  resnet10_half and SwAV's resnet50w2/w4/w5 have no torchvision/timm counterpart (use swav-fast eval).
  --from-official reads an official SwAV file (module.* keys, projection_head, prototypes; plain or
  under 'state_dict') with torch.load(weights_only=True) and writes a swav-fast checkpoint (model +
  config, no optimiser state) for eval and export.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trunk to torchvision/timm, or import official SwAV weights",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write a checkpoint's trunk as a torchvision/timm ResNet state dict "
                                   "(--checkpoint C --to T OUT), or convert an official SwAV checkpoint "
                                   "into a swav-fast checkpoint (--from-official FILE OUT).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="swav-fast checkpoint to export (ckpt-*.pt)")
    src.add_argument("--from-official", metavar="FILE",
                     help="official SwAV checkpoint (e.g. swav_800ep_pretrain.pth.tar) to import")
    p.add_argument("out", metavar="OUT", help="output file (written atomically)")
    p.add_argument("--to", choices=("torchvision", "timm"), help="export target (with --checkpoint)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="rows of the zero (untrained) fc layer (default 1000)")
    p.add_argument("--no-fc", action="store_true",
                   help="leave out fc.*: load with load_state_dict(sd, strict=False)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from swav_fast.export import ExportError, export_checkpoint, import_official_file

    if args.from_official:
        if args.to:
            raise ExportError("--to applies to --checkpoint exports; --from-official writes a swav-fast "
                              "checkpoint (export it afterwards with --checkpoint OUT --to ...)")
        info = import_official_file(args.from_official, args.out)
        text = (f"imported official SwAV {info.arch} ({info.num_tensors} tensors) into {info.path}; "
                f"evaluate with: swav-fast eval knn --checkpoint {info.path} --data DATA")
    else:
        if not args.to:
            raise ExportError("--checkpoint needs --to torchvision or --to timm")
        info = export_checkpoint(args.checkpoint, args.out, args.to, args.num_classes, not args.no_fc)
        fc = ("fc: none (load with strict=False)" if args.no_fc
              else f"fc: {info.fc}, untrained")
        text = f"exported {info.arch} trunk for {info.target} ({info.num_tensors} tensors, {fc}) to {info.path}"
    print(json.dumps(info.as_dict()) if args.json else text)
    return 0
