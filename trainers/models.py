"""Backbones: torchvision ResNets that return their stage feature maps (the ContrastiveCrop heatmap needs the
last stage before pooling, CsMl's multi-level heads the earlier ones), and the MLP heads the methods share.

Registry `BACKBONES`: `resnet18_cifar` (3×3 stride-1 stem, no max-pool: the small-dataset ResNet-18 of the
papers), `resnet18`, `resnet50` (torchvision, ImageNet stem) and `resnet_tiny` (widths 16–128, one block per
stage, CIFAR stem: for tests and the demo on a CPU).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torchvision.models import resnet

from viewpipe.errors import ViewpipeError


class Backbone(nn.Module):
    """A ResNet without its classifier. `forward(x)` is the last stage's map (B, C, h, w); `stages(x)` all
    four stages' maps; `dims` their channel counts; `dim` the pooled feature size."""

    def __init__(self, net: resnet.ResNet, cifar_stem: bool) -> None:
        super().__init__()
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.dims = tuple(_out_channels(layer) for layer in (self.layer1, self.layer2, self.layer3, self.layer4))
        self.dim = self.dims[-1]

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim): the last stage, average-pooled (the representation kNN and linear probes use)."""
        return self(x).mean(dim=(2, 3))


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    return (block.bn3 if isinstance(block, resnet.Bottleneck) else block.bn2).num_features


def _tiny() -> resnet.ResNet:
    net = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    widths, inplanes = (16, 32, 64, 128), 16
    net.conv1, net.bn1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16)
    layers = []
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != width:
            down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))
        layers.append(nn.Sequential(resnet.BasicBlock(inplanes, width, stride, down)))
        inplanes = width
    net.layer1, net.layer2, net.layer3, net.layer4 = layers
    return net


BACKBONES: dict[str, Callable[[], Backbone]] = {
    "resnet18_cifar": lambda: Backbone(resnet.resnet18(), cifar_stem=True),
    "resnet18": lambda: Backbone(resnet.resnet18(), cifar_stem=False),
    "resnet50": lambda: Backbone(resnet.resnet50(), cifar_stem=False),
    "resnet50_cifar": lambda: Backbone(resnet.resnet50(), cifar_stem=True),
    "resnet_tiny": lambda: Backbone(_tiny(), cifar_stem=True),
}


def build_backbone(name: str) -> Backbone:
    """A freshly initialised backbone from the registry."""
    if name not in BACKBONES:
        raise ViewpipeError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]()


def mlp(dims: list[int], hidden_bn: bool = True, last_bn: bool = False, last_bn_affine: bool = True) -> nn.Sequential:
    """Linear(-BN)-ReLU blocks through `dims`, the last layer Linear (optionally followed by BN). MoCo v2's head
    is mlp([d, d, 128], hidden_bn=False) (Linear-ReLU-Linear); SimSiam's projector mlp([d, d, d], last_bn=True,
    last_bn_affine=False), its predictor mlp([d, d/4, d])."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not hidden_bn))
        layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)] if hidden_bn else [nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)
