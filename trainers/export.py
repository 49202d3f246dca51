"""Export a pretrained backbone as a state dict that torchvision and timm models load with `strict=True`.

viewpipe's backbones keep their weights under their own names (a ResNet's stem is `stem.0` / `stem.1`, a ViT
sits in `net.*` with torchvision's names), so a plain `load_state_dict` into a stock model either fails or,
with `strict=False`, silently leaves the stem random. `export_state_dict` renames every weight to the target
layout and checks that none is left over:

- ResNets, `torchvision` or `timm` (both name a ResNet alike): `stem.0` → `conv1`, `stem.1` → `bn1`,
  `layer1`–`layer4` unchanged. `resnet18` / `resnet50` load into `torchvision.models.resnet18()` /
  `resnet50()` (and timm's `resnet18` / `resnet50`). The CIFAR variants (`resnet18_cifar`, `resnet50_cifar`,
  `resnet_tiny`) have a 3×3 stride-1 `conv1` and no max-pool: replace them in the stock model first
  (`m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = nn.Identity()`).
- ViTs, `timm`: timm's VisionTransformer names (`cls_token`, `pos_embed`, `patch_embed.proj`,
  `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`); `vit_small` loads into
  `timm.create_model("vit_small_patch16_224", num_heads=H)` with H the backbone's heads (`ExportInfo.heads`:
  12 for MoCo v3's ViT-S, timm's default is 6; the heads change no weight's shape, only the outputs).
  `torchvision`: torchvision's VisionTransformer names (`class_token`, `conv_proj`, `encoder.*`, `heads.head`).

Pretraining trains no classifier, yet a strict load needs one: the export holds a classifier (`fc` / `head` /
`heads.head`) of `num_classes` (default 1000, the stock models' default) with zero weights and bias, so the
logits are 0 until it is trained or replaced. `head=False` leaves it out (MoCo's convention; then load with
`strict=False` and check that only the classifier is reported missing).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.checkpoint import load_checkpoint, previous_path
from viewpipe.trainers.models import ViT, backbone_family, restore_backbone

FORMATS = ("torchvision", "timm")
CKPT = "last.pt"


@dataclass
class ExportInfo:
    """What was exported and how to load it."""

    backbone: str  # viewpipe's backbone name
    format: str
    source: Path  # the checkpoint file read
    num_classes: int  # rows of the zero classifier (0: none written)
    heads: int = 0  # a ViT's attention heads (0 for a ResNet)
    warnings: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        """"resnet" or "vit"."""
        return backbone_family(self.backbone)

    def how_to_load(self) -> str:
        """One line of Python that builds the stock model this export loads into with strict=True."""
        n = self.num_classes or 1000
        if self.family == "resnet":
            arch = self.backbone.removesuffix("_cifar")
            make = f"torchvision.models.{arch}(num_classes={n})" if self.format == "torchvision" else \
                f'timm.create_model("{arch}", num_classes={n})'
            if self.backbone == "resnet_tiny":
                make = "a torchvision ResNet(BasicBlock, [1, 1, 1, 1]) of widths 16, 32, 64, 128"
            if self.backbone.endswith("_cifar") or self.backbone == "resnet_tiny":
                make += " with conv1 = nn.Conv2d(3, C, 3, 1, 1, bias=False) and maxpool = nn.Identity()"
            return make
        if self.format == "timm":
            return f'timm.create_model("vit_small_patch16_224", num_heads={self.heads}, num_classes={n})' \
                if self.backbone == "vit_small" else \
                f"timm's VisionTransformer with this backbone's image/patch size, width, depth and num_heads={self.heads}"
        return f"torchvision.models.VisionTransformer(...) with num_heads={self.heads} and num_classes={n}"


def resnet_keys(key: str) -> str:
    """viewpipe's ResNet name → torchvision's (timm's ResNets use the same names)."""
    if key.startswith("stem.0."):
        return "conv1." + key.removeprefix("stem.0.")
    if key.startswith("stem.1."):
        return "bn1." + key.removeprefix("stem.1.")
    if re.match(r"layer[1-4]\.", key):
        return key
    raise ViewpipeError(f"export: unexpected ResNet weight {key!r}; was the checkpoint written by another viewpipe?")


_TIMM_BLOCK = {"ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
               "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
               "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
_TIMM_TOP = {"net.class_token": "cls_token", "net.conv_proj.weight": "patch_embed.proj.weight",
             "net.conv_proj.bias": "patch_embed.proj.bias", "net.encoder.pos_embedding": "pos_embed",
             "net.encoder.ln.weight": "norm.weight", "net.encoder.ln.bias": "norm.bias"}


def vit_timm_key(key: str) -> str:
    """viewpipe's ViT name (torchvision's VisionTransformer under `net.`) → timm's VisionTransformer name."""
    if key in _TIMM_TOP:
        return _TIMM_TOP[key]
    m = re.fullmatch(r"net\.encoder\.layers\.encoder_layer_(\d+)\.(.+)", key)
    if m:
        block, rest = m.groups()
        for ours, theirs in _TIMM_BLOCK.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"blocks.{block}.{theirs}{rest.removeprefix(ours)}"
    raise ViewpipeError(f"export: unexpected ViT weight {key!r}; was the checkpoint written by another viewpipe?")


def vit_torchvision_key(key: str) -> str:
    """viewpipe's ViT name → torchvision's VisionTransformer name (the same without `net.`)."""
    if not key.startswith("net."):
        raise ViewpipeError(f"export: unexpected ViT weight {key!r}; was the checkpoint written by another viewpipe?")
    return key.removeprefix("net.")


def convert_state_dict(backbone: torch.nn.Module, name: str, fmt: str, num_classes: int = 1000,
                       head: bool = True) -> dict[str, torch.Tensor]:
    """The backbone's weights (a viewpipe `Backbone` named `name` in the registry) renamed to `fmt`'s layout,
    with a zero classifier of `num_classes` unless `head=False`. Tensors are detached copies on the CPU."""
    if fmt not in FORMATS:
        raise ViewpipeError(f"export: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if head and num_classes < 1:
        raise ViewpipeError(f"export: num_classes must be ≥ 1 for the classifier, got {num_classes} (or export "
                            "without the classifier)")
    family = backbone_family(name)
    rename = resnet_keys if family == "resnet" else vit_timm_key if fmt == "timm" else vit_torchvision_key
    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.state_dict().items():
        new = rename(key)
        if new in out:  # a broken invariant of the mapping
            raise ViewpipeError(f"export: two weights map to {new!r}")
        out[new] = value.detach().to("cpu", copy=True).contiguous()
    if head:
        dim = int(backbone.dim)
        prefix = {"resnet": "fc", "vit": "head" if fmt == "timm" else "heads.head"}[family]
        out[f"{prefix}.weight"] = torch.zeros(num_classes, dim)
        out[f"{prefix}.bias"] = torch.zeros(num_classes)
    return out


def checkpoint_path(run_or_ckpt: str | os.PathLike[str]) -> Path:
    """A run folder → its `last.pt`; a file → itself."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        if not (path / CKPT).exists() and not previous_path(path / CKPT).exists():
            raise ViewpipeError(f"{path}: no {CKPT} in this folder; give a run folder of `viewpipe pretrain` "
                                "(runs/<name>) or a checkpoint file")
        return path / CKPT
    if not path.exists():
        raise ViewpipeError(f"{path}: no such run folder or checkpoint; give a run folder of `viewpipe pretrain` "
                            "(runs/<name>) or a checkpoint file")
    return path


def load_backbone(run_or_ckpt: str | os.PathLike[str]) -> tuple[torch.nn.Module, str, Path, list[str]]:
    """The pretrained backbone of a run folder or checkpoint (checksum verified, falling back to
    `last.prev.pt` when `last.pt` is damaged), built with the run's backbone_args: (backbone, name, the file
    read, warnings)."""
    path = checkpoint_path(run_or_ckpt)
    ckpt, used, warnings = load_checkpoint(path, required=("backbone_name", "backbone"))
    backbone = restore_backbone(ckpt, used)
    name = ckpt["backbone_name"]
    return backbone, name, used, warnings


def vit_heads(backbone: torch.nn.Module) -> int:
    """A ViT backbone's attention heads (not in its weights: the loading model must be told)."""
    if isinstance(backbone, ViT):
        return backbone.num_heads
    return 0


def export(run_or_ckpt: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str, num_classes: int = 1000,
           head: bool = True) -> ExportInfo:
    """Write the backbone of a run folder or checkpoint to `out` as a plain state dict (`torch.save`) in `fmt`'s
    layout (module docstring); returns what was written and how to load it."""
    backbone, name, used, warnings = load_backbone(run_or_ckpt)
    sd = convert_state_dict(backbone, name, fmt, num_classes, head)
    out = Path(out)
    if out.is_dir():
        raise ViewpipeError(f"{out}: is a folder; give the file to write (e.g. {out / 'backbone.pth'})")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.save(sd, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ViewpipeError(f"{out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
    return ExportInfo(backbone=name, format=fmt, source=used,
                      num_classes=num_classes if head else 0, heads=vit_heads(backbone), warnings=warnings)
