"""The augmentation's parameters, shared by both implementations (`viewpipe.torch_ops`, `viewpipe.fused`).

- `ViewAugment` (one view's photometric probabilities and strengths) and `AugmentConfig` (output size, the
  views' augmentations, normalisation), with the papers' presets (`PRESETS`, `preset`).
- `ViewParams`, drawn by `draw_params`: every sample's random parameters of one view, drawn from a CPU
  generator in a fixed order, so that a seed gives the same views on any device and through either
  implementation.
- The batch layout: `is_hwc` tells (N,H,W,3) from (N,3,H,W), `spatial_size` reads (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the official ContrastiveCrop CIFAR configs' normalisation (configs/small/cifar10/*.py, configs/small/cifar100/*.py)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class ViewAugment:
    """Photometric augmentation of one view; probabilities are per sample."""

    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    solarize_threshold: float = 0.5


@dataclass(frozen=True)
class AugmentConfig:
    """Output size, per-view augmentations (view v uses `views[v % len(views)]`) and normalisation."""

    size: int = 224
    views: tuple[ViewAugment, ...] = (ViewAugment(),)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    blur_kernel: int = 0  # odd kernel side; 0: about 10% of `size` (23 at 224), as SimCLR and BYOL

    @property
    def kernel_size(self) -> int:
        k = self.blur_kernel or int(0.1 * self.size)
        return max(3, k | 1)


_MOCOV2 = ViewAugment()
CLEAN_VIEW = ViewAugment(flip=0.0, jitter_p=0.0, grayscale=0.0, blur=0.0, solarize=0.0)  # no photometric change
PRESETS: dict[str, tuple[ViewAugment, ...]] = {
    # MoCo v2 "aug+" (ContrastiveCrop on ImageNet): jitter 0.4/0.4/0.4/0.1 p 0.8, gray 0.2, blur p 0.5, flip.
    "mocov2": (_MOCOV2,),
    # ContrastiveCrop on small datasets (CIFAR, Tiny ImageNet, STL-10): MoCo v2 without blur.
    "mocov2_small": (replace(_MOCOV2, blur=0.0),),
    # SimCLR: colour strength 1.0 (jitter 0.8/0.8/0.8/0.2).
    "simclr": (replace(_MOCOV2, jitter=(0.8, 0.8, 0.8, 0.2)),),
    # BYOL / MoCo v3 asymmetric: view 1 always blurred; view 2 rarely blurred and sometimes solarized.
    "byol": (
        replace(_MOCOV2, jitter=(0.4, 0.4, 0.2, 0.1), blur=1.0),
        replace(_MOCOV2, jitter=(0.4, 0.4, 0.2, 0.1), blur=0.1, solarize=0.2),
    ),
}
# CIFAR twins, normalised with the dataset's own mean and std as the official CIFAR configs are (the presets
# above use ImageNet's): "mocov2_cifar10"/"mocov2_cifar100" are mocov2_small, "byol_cifar10" is byol
PRESETS |= {"mocov2_cifar10": PRESETS["mocov2_small"], "mocov2_cifar100": PRESETS["mocov2_small"],
            "byol_cifar10": PRESETS["byol"]}
# (mean, std) of the presets that do not normalise with ImageNet's
PRESET_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "mocov2_cifar10": (CIFAR10_MEAN, CIFAR10_STD), "mocov2_cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "byol_cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}


def preset(name: str, size: int = 224, **overrides: object) -> AugmentConfig:
    """The named augmentation preset (`PRESETS`) at output `size`, normalised with its dataset's mean and std
    (`PRESET_NORMS`; ImageNet's otherwise) unless `overrides` give them."""
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {sorted(PRESETS)}")
    mean, std = PRESET_NORMS.get(name, (IMAGENET_MEAN, IMAGENET_STD))
    kwargs = {"mean": mean, "std": std, **overrides}
    return AugmentConfig(size=size, views=PRESETS[name], **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- per-sample parameters
@dataclass
class ViewParams:
    """Per-sample random parameters of one view (CPU tensors), drawn by `draw_params`."""

    flip: torch.Tensor  # bool (n,)
    jitter: torch.Tensor  # bool (n,)
    factors: torch.Tensor  # (n, 4): brightness, contrast, saturation, hue
    order: torch.Tensor  # (n, 4) a permutation of the four jitter ops per sample
    gray: torch.Tensor  # bool (n,)
    blur: torch.Tensor  # bool (n,)
    sigma: torch.Tensor  # (n,)
    solarize: torch.Tensor  # bool (n,)


def draw_params(cfg: ViewAugment, n: int, generator: torch.Generator | None = None) -> ViewParams:
    """Draw the parameters of one view for n samples (in a fixed order, so a seed fixes everything)."""

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    b, c, s, h = cfg.jitter
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    return ViewParams(
        flip=u(n) < cfg.flip,
        jitter=u(n) < cfg.jitter_p,
        factors=lo + (hi - lo) * u(n, 4),
        order=u(n, 4).argsort(dim=1),
        gray=u(n) < cfg.grayscale,
        blur=u(n) < cfg.blur,
        sigma=cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u(n),
        solarize=u(n) < cfg.solarize,
    )


# ---------------------------------------------------------------------------- layout
def is_hwc(shape: Sequence[int], layout: str) -> bool:
    """Whether an image of `shape` ((H,W,3) or (3,H,W)) is channels-last: `layout` "hwc"/"chw" says so, "auto"
    reads it from the shape (refused where both axes could be the channels')."""
    if layout not in ("auto", "hwc", "chw"):
        raise ValueError(f"layout must be 'auto', 'hwc' or 'chw', got {layout!r}")
    if layout != "auto":
        return layout == "hwc"
    if shape[-1] == 3 and shape[0] != 3:
        return True
    if shape[0] == 3:
        return False
    raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(shape)}: pass layout='hwc' or 'chw'")


def spatial_size(x: torch.Tensor, layout: str) -> tuple[int, int]:
    """(H, W) of a batch in `layout` ("auto", "hwc" or "chw")."""
    return (x.shape[1], x.shape[2]) if is_hwc(x.shape[1:], layout) else (x.shape[2], x.shape[3])
