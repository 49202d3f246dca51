"""Backbones: torchvision ResNets and ViTs that return their stage feature maps (the ContrastiveCrop heatmap needs the
last stage before pooling, CsMl's multi-level heads the earlier ones), and the MLP heads the methods share.

Registry `BACKBONES`: `resnet18_cifar` (3×3 stride-1 stem, no max-pool: the small-dataset ResNet-18 of the
papers), `resnet18`, `resnet50` (torchvision, ImageNet stem), `resnet_tiny` (widths 16–128, one block per
stage, CIFAR stem: for tests and the demo on a CPU), `vit_small` (ViT-S/16 at 224), `vit_small_cifar` (ViT-S
with 4×4 patches at 32) and `vit_tiny` (for tests).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torchvision.models import resnet

from viewpipe.errors import ViewpipeError


class Backbone(nn.Module):
    """A network without its classifier, seen as four stages. `stages(x)` is the four stages' maps (B, C, h, w);
    `forward(x)` the last one; `dims` their channel counts; `dim` the pooled feature size; `pooled(x)` the
    representation kNN and linear probes use."""

    dims: tuple[int, ...]
    dim: int

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim): the last stage, average-pooled."""
        return self(x).mean(dim=(2, 3))


class ResNet(Backbone):
    """A torchvision ResNet without its classifier; `cifar_stem` replaces the 7×7 stride-2 stem and max-pool
    by a 3×3 stride-1 convolution (the small-dataset ResNet of the papers)."""

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


class ViT(Backbone):
    """A torchvision VisionTransformer without its classifier. Its stages are the patch-token maps after each
    quarter of the blocks (B, width, h, w), the last after the final LayerNorm (so the ContrastiveCrop heatmap
    and multi-level heads work as on a ResNet); `pooled` is the class token after the final LayerNorm, as in
    MoCo v3. The input side is fixed at `image_size`."""

    def __init__(self, image_size: int, patch_size: int, layers: int, heads: int, width: int) -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        if layers % 4:
            raise ViewpipeError(f"ViT: {layers} blocks do not split into four stages")
        self.net = VisionTransformer(image_size, patch_size, layers, heads, width, 4 * width)
        self.net.heads = nn.Identity()
        self.grid = image_size // patch_size
        self.dims, self.dim = (width,) * 4, width

    def _tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tokens (B, 1 + h·w, width) after each quarter of the blocks, the last normalised."""
        net = self.net
        x = net._process_input(x)
        x = torch.cat([net.class_token.expand(len(x), -1, -1), x], dim=1)
        x = net.encoder.dropout(x + net.encoder.pos_embedding)
        out, per = [], len(net.encoder.layers) // 4
        for i, block in enumerate(net.encoder.layers):
            x = block(x)
            if (i + 1) % per == 0:
                out.append(x)
        out[-1] = net.encoder.ln(out[-1])
        return out

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, g = len(x), self.grid
        return [t[:, 1:].transpose(1, 2).reshape(B, -1, g, g) for t in self._tokens(x)]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)[-1][:, 0]


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
    "resnet18_cifar": lambda: ResNet(resnet.resnet18(), cifar_stem=True),
    "resnet18": lambda: ResNet(resnet.resnet18(), cifar_stem=False),
    "resnet50": lambda: ResNet(resnet.resnet50(), cifar_stem=False),
    "resnet50_cifar": lambda: ResNet(resnet.resnet50(), cifar_stem=True),
    "resnet_tiny": lambda: ResNet(_tiny(), cifar_stem=True),
    "vit_small": lambda: ViT(224, 16, 12, 6, 384),  # ViT-S/16 (DeiT-S), MoCo v3's and SNCLR's
    "vit_small_cifar": lambda: ViT(32, 4, 12, 6, 384),  # ViT-S on 32×32 images: 8×8 patches of 4
    "vit_tiny": lambda: ViT(32, 8, 4, 2, 64),  # 4 blocks of width 64: for tests on a CPU
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
