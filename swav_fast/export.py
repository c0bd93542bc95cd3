"""Export a trunk to torchvision / timm, and import the official SwAV checkpoints.

**Export** (:func:`export_trunk`, ``swav-fast export --checkpoint C --to torchvision|timm OUT``):
the trunk's weights without the ``trunk.`` prefix, as a plain state dict that loads without any
renaming::

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load("OUT.pt", weights_only=True))   # strict

Our trunk has no classifier, but torchvision's ``resnet*()`` has one (``fc``), so the export adds an
**untrained, all-zero** ``fc.weight [num_classes, D]`` / ``fc.bias [num_classes]`` (1000 classes by
default) to make the strict load work; its logits are all zero until you train it (linear probe,
fine-tuning). With ``include_fc=False`` (``--no-fc``) the file has trunk keys only: load it with
``load_state_dict(sd, strict=False)`` (only ``fc.*`` are then reported missing).

timm's ResNets (``timm.create_model("resnet50")``, also resnet18/34/101/152, wide_resnet50_2) use
exactly torchvision's parameter and buffer names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ..., ``fc``), so the ``timm`` target writes the same state dict; timm is
not a dependency and the naming is checked against torchvision's model. Only architectures that
exist in torchvision and timm can be exported (:data:`EXPORTABLE_ARCHS`); SwAV's resnet50w2/w4/w5
and the small CPU trunks have no counterpart there and raise :class:`ExportError`.

**Import** (:func:`import_official`, ``swav-fast export --from-official FILE OUT``): the official
SwAV checkpoints (``swav_800ep_pretrain.pth.tar`` from the model zoo, or a training
``checkpoint.pth.tar``) are a state dict, possibly under ``"state_dict"``, with keys
``module.conv1.weight``, ``module.layer1.0...``, ``module.projection_head.{0,1,3}.*`` (Linear,
BatchNorm1d, Linear) and ``module.prototypes.weight [K, d]``. They map to our ``trunk.*``,
``head.mlp.*`` and ``prototypes.weight``; the architecture is found by matching the trunk's
parameter names and shapes against our trunk registry (resnet50, resnet50w2/w4/w5, ...), and the
head sizes come from the tensor shapes. The result is a swav-fast checkpoint (model + config) that
``swav-fast eval knn|linear`` and ``export --to`` accept. It holds no optimiser state, so it is not
for ``train --resume``. Files are always read with ``torch.load(weights_only=True)``.

All outputs are written atomically (temp file, fsync, rename).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from swav_fast.errors import CheckpointError, SwavFastError

#: Architectures of ours that exist, with the same structure and names, in torchvision and timm.
EXPORTABLE_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
TARGETS = ("torchvision", "timm")
#: Architectures tried, in order, when recognising an official checkpoint's trunk.
OFFICIAL_ARCHS = ("resnet50", "resnet50w2", "resnet50w4", "resnet50w5", "resnet18", "resnet34",
                  "resnet101", "resnet152", "wide_resnet50_2", "resnet18w2")


class ExportError(SwavFastError):
    """A checkpoint that cannot be exported to (or imported from) the requested format."""


@dataclass
class ExportInfo:
    path: str
    target: str  # torchvision | timm | swav-fast
    arch: str
    num_tensors: int
    fc: str  # "zeros [C, D]" / "none" for exports; "-" for imports

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- export ----------------------------------------------------------------------------------------
def trunk_state_dict(model_state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The ``trunk.*`` entries of a SwAVModel state dict, prefix removed."""
    out = OrderedDict((k[len("trunk."):], v) for k, v in model_state.items() if k.startswith("trunk."))
    if not out:
        raise ExportError("the checkpoint's model has no 'trunk.*' weights")
    return out


def reference_shapes(arch: str, num_classes: int = 1000) -> "OrderedDict[str, torch.Size]":
    """Names and shapes of ``torchvision.models.<arch>(num_classes=...)``'s state dict (built on meta)."""
    import torchvision.models as tvm

    if arch not in EXPORTABLE_ARCHS:
        raise ExportError(f"arch {arch!r} has no torchvision/timm counterpart, so it cannot be exported "
                          f"(the main job's resnet10_half and SwAV's wide resnet50w2/w4/w5 stay swav-fast "
                          f"checkpoints: evaluate them with 'swav-fast eval'); exportable archs: "
                          f"{', '.join(EXPORTABLE_ARCHS)} (train with e.g. --arch resnet18)")
    with torch.device("meta"):
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


def export_trunk(state: Mapping[str, Any], target: str = "torchvision", num_classes: int = 1000,
                 include_fc: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """A torchvision/timm ResNet state dict from a swav-fast checkpoint dict (``model`` + ``config``).

    ``include_fc`` adds a zero (untrained) classifier of ``num_classes`` outputs so that a strict
    ``load_state_dict`` works; the names and shapes are checked against torchvision's model.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    arch = (state.get("config") or {}).get("model", {}).get("arch")
    if not arch:
        raise ExportError("the checkpoint has no config.model.arch; cannot tell which ResNet it is")
    if num_classes < 1:
        raise ExportError(f"num_classes must be >= 1, got {num_classes}")
    ref = reference_shapes(arch, num_classes)
    sd = trunk_state_dict(state["model"])
    expected = OrderedDict((k, s) for k, s in ref.items() if not k.startswith("fc."))
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items()
           if k in sd and sd[k].shape != s]
    if missing or extra or bad:
        raise ExportError(f"trunk weights do not match {target} {arch}: "
                          f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {bad[:3]}")
    out = OrderedDict((k, sd[k].detach().cpu().clone()) for k in expected)
    if include_fc:
        fc_out, fc_in = ref["fc.weight"]
        out["fc.weight"] = torch.zeros(fc_out, fc_in, dtype=out["conv1.weight"].dtype)
        out["fc.bias"] = torch.zeros(fc_out, dtype=out["conv1.weight"].dtype)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, target: str = "torchvision",
                      num_classes: int = 1000, include_fc: bool = True) -> ExportInfo:
    """Load a swav-fast checkpoint, export its trunk (:func:`export_trunk`), write ``out`` atomically."""
    from swav_fast.checkpoint import atomic_save, load_checkpoint

    state = load_checkpoint(checkpoint)
    sd = export_trunk(state, target, num_classes, include_fc)
    atomic_save(sd, out)
    arch = state["config"]["model"]["arch"]
    fc = f"zeros {list(sd['fc.weight'].shape)}" if include_fc else "none"
    return ExportInfo(str(out), target, arch, len(sd), fc)


# -- import of the official SwAV checkpoints ----------------------------------------------------------
def _official_state(raw: Any) -> dict[str, torch.Tensor]:
    """The model state dict of an official file, ``module.`` prefixes removed."""
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping) \
            and any(k.startswith("trunk.") for k in raw["model"]):
        raise ExportError("this is already a swav-fast checkpoint, not an official SwAV one")
    if not isinstance(raw, Mapping) or not raw:
        raise ExportError("not an official SwAV checkpoint: expected a state dict (or one under "
                          "'state_dict') of tensors")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ExportError(f"not an official SwAV checkpoint: entry {k!r} is not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _match_trunk(trunk: Mapping[str, torch.Tensor]) -> str:
    from swav_fast.models.trunks import build_trunk

    def shapes(arch: str) -> dict[str, torch.Size]:
        with torch.device("meta"):
            return {k: v.shape for k, v in build_trunk(arch).state_dict().items()}

    given = {k: v.shape for k, v in trunk.items() if not k.endswith("num_batches_tracked")}
    for arch in OFFICIAL_ARCHS:
        ref = {k: s for k, s in shapes(arch).items() if not k.endswith("num_batches_tracked")}
        if ref == given:
            return arch
    conv1 = tuple(given["conv1.weight"]) if "conv1.weight" in given else None
    raise ExportError(f"the trunk ({len(given)} tensors, conv1 {conv1}) matches none of "
                      f"{', '.join(OFFICIAL_ARCHS)}")


def import_official(raw: Any, source: str = "") -> dict[str, Any]:
    """A swav-fast checkpoint dict (``model``, ``config``, ...) from an official SwAV state dict."""
    from swav_fast.config import Config

    state = _official_state(raw)
    if any(k.startswith("prototypes.prototypes") for k in state):
        raise ExportError("multi-head prototypes (nmb_prototypes with several values) are not "
                          "supported: swav-fast models have one prototype layer")
    if "prototypes.weight" not in state:
        raise ExportError("no 'prototypes.weight' in the checkpoint (a SwAV model without "
                          "prototypes cannot be imported)")
    trunk = {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}
    head = {k[len("projection_head."):]: v for k, v in state.items() if k.startswith("projection_head.")}
    if not head:
        raise ExportError("no 'projection_head.*' weights in the checkpoint")
    arch = _match_trunk(trunk)
    protos = state["prototypes.weight"]
    if "0.weight" in head:  # Linear(D, hidden) - BN - ReLU - Linear(hidden, d)
        hidden_dim = int(head["0.weight"].shape[0])
        if "3.weight" not in head:
            raise ExportError("projection head has a first layer but no 'projection_head.3'")
    elif "weight" in head:  # a single Linear(D, d) (hidden_mlp=0)
        hidden_dim = 0
    else:
        raise ExportError(f"unrecognised projection head keys: {sorted(head)[:4]}")
    cfg = Config()
    cfg.model.arch = arch
    cfg.model.hidden_dim = hidden_dim
    cfg.model.feat_dim = int(protos.shape[1])
    cfg.model.num_prototypes = int(protos.shape[0])

    model_sd: dict[str, torch.Tensor] = {}
    model_sd.update({f"trunk.{k}": v for k, v in trunk.items()})
    model_sd.update({f"head.mlp.{k}": v for k, v in head.items()})
    model_sd["prototypes.weight"] = protos
    model_sd = _complete_and_check(model_sd, cfg)
    epoch = raw.get("epoch", 0) if isinstance(raw, Mapping) else 0
    return {"format": "swav-fast/1", "model": model_sd, "config": cfg.to_dict(), "step": 0,
            "epoch": int(epoch) if isinstance(epoch, int) else 0,
            "source": f"official SwAV checkpoint {source}".strip()}


def _complete_and_check(model_sd: dict[str, torch.Tensor], cfg) -> "OrderedDict[str, torch.Tensor]":
    """Order like our model, add missing ``num_batches_tracked`` buffers, verify every shape."""
    from swav_fast.models import SwAVModel

    m = cfg.model
    with torch.device("meta"):
        ref = SwAVModel(m.arch, m.hidden_dim, m.feat_dim, m.num_prototypes).state_dict()
    out = OrderedDict()
    for k, v in ref.items():
        if k in model_sd:
            if model_sd[k].shape != v.shape:
                raise ExportError(f"{k}: shape {tuple(model_sd[k].shape)}, expected {tuple(v.shape)}")
            out[k] = model_sd[k].detach().cpu().clone()
        elif k.endswith("num_batches_tracked"):  # older torch versions did not save it
            out[k] = torch.tensor(0, dtype=torch.long)
        else:
            raise ExportError(f"the official checkpoint lacks {k}")
    extra = sorted(set(model_sd) - set(ref))
    if extra:
        raise ExportError(f"unexpected weights in the official checkpoint: {extra[:4]}")
    return out


def import_official_file(path: str | Path, out: str | Path) -> ExportInfo:
    """Read an official SwAV file (``weights_only=True``), write a swav-fast checkpoint atomically."""
    import pickle
    import zipfile

    from swav_fast.checkpoint import atomic_save

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain "
                              f"data (weights_only load failed: {str(exc).splitlines()[0]})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    try:
        state = import_official(raw, source=path.name)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from exc
    atomic_save(state, out)
    return ExportInfo(str(out), "swav-fast", state["config"]["model"]["arch"], len(state["model"]), "-")
