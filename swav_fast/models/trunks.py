"""Trunk registry: torchvision ResNets (and width multipliers) without the classifier."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pipelines.registry import Registry

#: name (``model.arch`` / ``--arch``) -> a function building the trunk
TRUNKS: Registry[Callable[[], nn.Module]] = Registry("trunk")


def register_trunk(name: str):
    """Decorator: register a trunk factory under ``name`` (the shape of every registry)."""
    return TRUNKS.register(name)


class WideResNet(ResNet):
    """ResNet whose every stage is ``width`` times wider (SwAV's resnet50w2/w4/w5; or narrower).

    Unlike torchvision's ``wide_resnet50_2`` (wider bottleneck only), stem and all stages scale.
    """

    def __init__(self, block: type, layers: list[int], width: float):
        super().__init__(block, layers)
        base = int(64 * width)
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.fc = nn.Linear(base * 8 * block.expansion, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _strip(model: ResNet) -> nn.Module:
    model.feature_dim = model.fc.in_features  # type: ignore[attr-defined]
    model.fc = nn.Identity()
    return model


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2"):
    register_trunk(_name)(lambda _n=_name: _strip(getattr(tvm, _n)(weights=None)))
for _w in (2, 4, 5):
    register_trunk(f"resnet50w{_w}")(lambda _w=_w: _strip(WideResNet(Bottleneck, [3, 4, 6, 3], _w)))
register_trunk("resnet18w2")(lambda: _strip(WideResNet(BasicBlock, [2, 2, 2, 2], 2)))
# A ResNet-10 at half width (256-d features): ~10x cheaper than resnet18, for CPU demos and tests.
register_trunk("resnet10_half")(lambda: _strip(WideResNet(BasicBlock, [1, 1, 1, 1], 0.5)))


def available_trunks() -> list[str]:
    return TRUNKS.names()


def build_trunk(name: str) -> nn.Module:
    """A trunk mapping ``[N,3,H,W]`` images to ``[N, trunk.feature_dim]`` pooled features."""
    return TRUNKS.get(name)()  # ConfigError naming the valid trunks
