"""Backbones: torchvision ResNets and ViTs that return their stage feature maps (the ContrastiveCrop heatmap needs the
last stage before pooling, CsMl's multi-level heads the earlier ones), and the MLP heads the methods share.

Registry `BACKBONES`: `resnet18_cifar` (3×3 stride-1 stem, no max-pool: the small-dataset ResNet-18 of the
papers), `resnet18`, `resnet50` (torchvision, ImageNet stem), `resnet_tiny` (widths 16–128, one block per
stage, CIFAR stem: for tests and the demo on a CPU), `vit_small` (ViT-S/16 at 224), `vit_small_cifar` (ViT-S
with 4×4 patches at 32) and `vit_tiny` (for tests). `build_backbone(name, **args)` passes the config's
`backbone_args` to the constructor: ResNets take `zero_init_residual` (default False, torchvision's; the SimSiam
configs set it, as the official ones do); ViTs take `heads`, `pos_embed`, `stop_grad_conv1` and `init`, whose
defaults are the MoCo v3 / SNCLR release's ViT (`vits.py`: 12 heads for ViT-S, a fixed 2-D sin-cos position
embedding, a frozen random patch projection, MoCo v3's initialisation).
"""

from __future__ import annotations

import math
from functools import partial
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

    def __init__(self, net: resnet.ResNet, cifar_stem: bool, zero_init_residual: bool = False) -> None:
        super().__init__()
        if zero_init_residual:  # the last BN of each residual branch starts at 0: each block starts as the identity
            for m in net.modules():
                if isinstance(m, resnet.Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, resnet.BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
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
    MoCo v3. The input side is fixed at `image_size`.

    Options (defaults: MoCo v3's `vits.py`, which SNCLR's release uses unchanged): `pos_embed` "sincos" (fixed
    2-D sin-cos, class token 0, not trained) or "learned" (torchvision's); `stop_grad_conv1` freezes the patch
    projection at its random initialisation; `init` "mocov3" (Q, K, V each Xavier-uniform, other Linears
    Xavier-uniform with zero bias, patch projection uniform ±√(6 / (3·p² + width)), class token N(0, 1e-6²))
    or "torchvision"."""

    def __init__(self, image_size: int, patch_size: int, layers: int, heads: int, width: int,
                 pos_embed: str = "sincos", stop_grad_conv1: bool = True, init: str = "mocov3") -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        if layers % 4:
            raise ViewpipeError(f"ViT: {layers} blocks do not split into four stages")
        if pos_embed not in ("sincos", "learned"):
            raise ViewpipeError(f"ViT pos_embed {pos_embed!r}: expected sincos (MoCo v3, SNCLR) or learned")
        if init not in ("mocov3", "torchvision"):
            raise ViewpipeError(f"ViT init {init!r}: expected mocov3 (MoCo v3, SNCLR) or torchvision")
        if width % heads:
            raise ViewpipeError(f"ViT heads = {heads} must divide the width {width}; pick a divisor of {width}")
        if pos_embed == "sincos" and width % 4:
            raise ViewpipeError(f"ViT pos_embed sincos needs a width divisible by 4, got {width}")
        self.net = VisionTransformer(image_size, patch_size, layers, heads, width, 4 * width)
        self.net.heads = nn.Identity()
        self.grid = image_size // patch_size
        self.dims, self.dim = (width,) * 4, width
        self.num_heads, self.pos_embed, self.stop_grad_conv1 = heads, pos_embed, stop_grad_conv1
        if init == "mocov3":
            self._mocov3_init(patch_size, width)
        if pos_embed == "sincos":
            with torch.no_grad():
                self.net.encoder.pos_embedding.copy_(sincos_pos_embed(self.grid, width))
            self.net.encoder.pos_embedding.requires_grad_(False)
        if stop_grad_conv1:
            for p in self.net.conv_proj.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def _mocov3_init(self, patch_size: int, width: int) -> None:
        """MoCo v3's `VisionTransformerMoCo.__init__` initialisation on torchvision's modules."""
        for m in self.net.modules():
            if isinstance(m, nn.MultiheadAttention):  # its in_proj is timm's qkv: Q, K and V treated apart
                val = math.sqrt(6.0 / float(m.in_proj_weight.shape[0] // 3 + m.in_proj_weight.shape[1]))
                nn.init.uniform_(m.in_proj_weight, -val, val)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.net.class_token, std=1e-6)
        val = math.sqrt(6.0 / float(3 * patch_size * patch_size + width))
        nn.init.uniform_(self.net.conv_proj.weight, -val, val)
        nn.init.zeros_(self.net.conv_proj.bias)

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


def sincos_pos_embed(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, 1 + grid², width): MoCo v3's fixed 2-D sin-cos position embedding (`build_2d_sincos_position_embedding`,
    line for line: a zero row for the class token, then per patch [sin, cos] of one grid coordinate and [sin, cos]
    of the other, each over width/4 frequencies 1/temperature^(i/(width/4)))."""
    coords = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    pos_dim = width // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)
    return torch.cat([torch.zeros(1, width), emb])[None]


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


def _resnet(make: Callable[[], resnet.ResNet], cifar_stem: bool, zero_init_residual: bool = False) -> ResNet:
    return ResNet(make(), cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)


# each entry is called with the config's backbone_args as keyword arguments
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18_cifar": partial(_resnet, resnet.resnet18, cifar_stem=True),
    "resnet18": partial(_resnet, resnet.resnet18, cifar_stem=False),
    "resnet50": partial(_resnet, resnet.resnet50, cifar_stem=False),
    "resnet50_cifar": partial(_resnet, resnet.resnet50, cifar_stem=True),
    "resnet_tiny": partial(_resnet, _tiny, cifar_stem=True),
    # ViT-S/16, MoCo v3's and SNCLR's (vits.py: depth 12, width 384, 12 heads, MLP ratio 4)
    "vit_small": partial(ViT, image_size=224, patch_size=16, layers=12, heads=12, width=384),
    "vit_small_cifar": partial(ViT, image_size=32, patch_size=4, layers=12, heads=12, width=384),  # 8×8 patches
    "vit_tiny": partial(ViT, image_size=32, patch_size=8, layers=4, heads=2, width=64),  # for tests on a CPU
}
BACKBONE_ARGS = {"resnet": ("zero_init_residual",), "vit": ("heads", "pos_embed", "stop_grad_conv1", "init")}


def backbone_family(name: str) -> str:
    """"vit" or "resnet": the family of backbone `name` (its BACKBONE_ARGS, its export layout)."""
    return "vit" if name.startswith("vit") else "resnet"


def build_backbone(name: str, **args: object) -> Backbone:
    """A freshly initialised backbone from the registry, its constructor given `args` (the config's
    backbone_args); an unknown name or argument is a one-line error listing what is known."""
    if name not in BACKBONES:
        raise ViewpipeError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    known = BACKBONE_ARGS[backbone_family(name)]
    if unknown := sorted(set(args) - set(known)):
        raise ViewpipeError(f"backbone_args for {name}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return BACKBONES[name](**args)


def mlp(dims: list[int], hidden_bn: bool = True, last_bn: bool = False, last_bn_affine: bool = True,
        last_bias: bool | None = None) -> nn.Sequential:
    """Linear(-BN)-ReLU blocks through `dims`, the last layer Linear (optionally followed by BN; with a bias
    unless followed by BN, or as `last_bias` says). MoCo v2's head is mlp([d, d, 128], hidden_bn=False)
    (Linear-ReLU-Linear); SimSiam's projector mlp([d, d, d], last_bn=True, last_bn_affine=False), its predictor
    mlp([d, d/4, d]); MoCo v3's MLPs have no bias at all (`last_bias=False`)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not hidden_bn))
        layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)] if hidden_bn else [nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn if last_bias is None else last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)


def restore_backbone(ckpt: dict, where: str | object, hint: str = "") -> Backbone:
    """The backbone a pretraining checkpoint names, built with its run's `backbone_args` (ViT heads change no
    weight's shape, only the outputs) and loaded with its weights. A name, arguments or weights that do not fit
    are one ViewpipeError line naming `where`, then `hint` (what to do), if given."""
    fix = f"; {hint}" if hint else ""
    name = ckpt["backbone_name"]
    if name not in BACKBONES:
        raise ViewpipeError(f"{where}: unknown backbone {name!r} (available: {', '.join(BACKBONES)}); "
                            "was it written by a newer viewpipe?")
    config = ckpt.get("config")
    args = config.get("backbone_args") if isinstance(config, dict) else None
    try:
        backbone = build_backbone(name, **(args if isinstance(args, dict) else {}))
    except TypeError as exc:
        raise ViewpipeError(f"{where}: backbone_args {args} do not fit {name!r} ({exc}){fix}") from None
    try:
        backbone.load_state_dict(ckpt["backbone"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ViewpipeError(f"{where}: the backbone weights do not fit {name!r} ({reason}){fix}") from None
    return backbone
