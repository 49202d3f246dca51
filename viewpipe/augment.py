"""Batched view augmentation in torch, on the GPU or the CPU: one implementation for every backend.

Crop-and-resize from per-sample windows (`torchvision.ops.roi_align`, which averages bilinear samples over
each output pixel's footprint, an antialiased resize), then per-sample random flip, colour jitter with
torchvision's semantics and a random order per sample, grayscale, Gaussian blur with a per-sample σ,
solarize, and normalisation. Random parameters are drawn from a CPU `torch.Generator` so that a seed gives
the same views on any device and masks need no device-to-host synchronisation.

Standalone use, on any uint8 batch::

    import torch
    from viewpipe.augment import Augmenter, preset
    images = torch.randint(0, 256, (8, 3, 256, 320), dtype=torch.uint8, device="cuda")  # or NHWC, or a list
    windows = torch.tensor([[0, 0, 256, 320], [32, 40, 128, 160]]).repeat(8, 1, 1)      # (N, views, 4): top, left, h, w
    aug = Augmenter(preset("mocov2", size=224))
    view1, view2 = aug(images, windows, generator=torch.Generator().manual_seed(0))  # (8, 3, 224, 224) each
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the official ContrastiveCrop CIFAR configs' normalisation (configs/small/cifar10/*.py, configs/small/cifar100/*.py)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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


# ---------------------------------------------------------------------------- layout and crops
def to_nchw(images: torch.Tensor | Sequence[torch.Tensor], layout: str = "auto") -> torch.Tensor:
    """A uint8 batch (N,H,W,3) / (N,3,H,W), or a list of (H,W,3) / (3,H,W) images of different sizes,
    as one float (N,3,H,W) tensor in [0, 255]; smaller images are edge-padded to the largest."""
    if isinstance(images, torch.Tensor):
        x = images
        if _is_hwc(x.shape[1:], layout):
            x = x.permute(0, 3, 1, 2)
        return x.float()
    items = [im.permute(2, 0, 1) if _is_hwc(im.shape, layout) else im for im in images]
    H, W = max(im.shape[1] for im in items), max(im.shape[2] for im in items)
    out = torch.empty((len(items), 3, H, W), dtype=torch.float32, device=items[0].device)
    for n, im in enumerate(items):
        h, w = im.shape[1:]
        out[n, :, :h, :w] = im
        out[n, :, h:, :w] = out[n, :, h - 1 : h, :w]  # replicate the last row and column, so that
        out[n, :, :, w:] = out[n, :, :, w - 1 : w]  # bilinear samples at the border never see padding
    return out


def _is_hwc(shape: Sequence[int], layout: str) -> bool:
    if layout not in ("auto", "hwc", "chw"):
        raise ValueError(f"layout must be 'auto', 'hwc' or 'chw', got {layout!r}")
    if layout != "auto":
        return layout == "hwc"
    if shape[-1] == 3 and shape[0] != 3:
        return True
    if shape[0] == 3:
        return False
    raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(shape)}: pass layout='hwc' or 'chw'")


def crop_resize(images: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (top, left, height, width) of `images` (N,3,H,W float), windows (N,V,4), resized to size×size.
    Returns (V·N, 3, size, size) ordered view-major (all samples' view 0, then view 1, ...). roi_align indexes
    its input with 32-bit integers, so a batch of large images goes through it in chunks of samples."""
    import torchvision.ops

    N, V = windows.shape[:2]
    win = windows.to(device=images.device, dtype=torch.float32).transpose(0, 1).reshape(V * N, 4)
    idx = torch.arange(N, device=images.device, dtype=torch.float32).repeat(V)
    top, left, h, w = win.unbind(1)
    rois = torch.stack([idx, left, top, left + w, top + h], dim=1)
    per_image = max(1, images[0].numel()) if N else 1
    chunk = max(1, (2**31 - 1) // per_image)
    if N <= chunk:
        return torchvision.ops.roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                                         aligned=True)
    out = images.new_empty((V * N, images.shape[1], size, size))
    for lo in range(0, N, chunk):
        sel = torch.cat([torch.arange(lo, min(N, lo + chunk)) + v * N for v in range(V)]).to(images.device)
        part = rois[sel].clone()
        part[:, 0] -= lo
        out[sel] = torchvision.ops.roi_align(images[lo : lo + chunk].contiguous(), part, (size, size),
                                             spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out


# ---------------------------------------------------------------------------- photometric ops (float in [0,1])
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n,3,H,W) → (n,1,H,W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = _bcast(ratio)
    return (r * a + (1 - r) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _bcast(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by f ∈ [-0.5, 0.5] (a fraction of the circle), through HSV as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * fr)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - fr))).clamp(0.0, 1.0)
    # the six HSV sectors pick (r, g, b) from (v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q):
    # selected in place rather than stacked into a (n, 3, 6, H, W) tensor
    r2 = torch.where(i == 0, v, torch.where(i == 1, q, torch.where(i < 4, p, torch.where(i == 4, t, v))))
    g2 = torch.where(i == 0, t, torch.where(i < 3, v, torch.where(i == 3, q, p)))
    b2 = torch.where(i < 2, p, torch.where(i == 2, t, torch.where(i < 5, v, q)))
    return torch.stack((r2, g2, b2), dim=1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur (separable, reflect padding, torchvision's kernel) of (n,C,H,W)."""
    n, c, H, W = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma.to(x)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, H, W)


# ---------------------------------------------------------------------------- parameters and the module
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


def _apply(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """x[mask] = fn(x[mask], *args[mask]) with the mask on the CPU (no device synchronisation)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    dev = idx.to(x.device, non_blocking=True)
    x.index_copy_(0, dev, fn(x.index_select(0, dev), *(a[idx].to(x.device, non_blocking=True) for a in args)))
    return x


def photometric(x: torch.Tensor, p: ViewParams, cfg: ViewAugment, kernel_size: int) -> torch.Tensor:
    """Apply one view's flip, jitter (in each sample's order), grayscale, blur and solarize to (n,3,H,W) in [0,1]."""
    x = _apply(x, p.flip, lambda v: v.flip(-1))
    for stage in range(4):
        for op in range(4):
            if cfg.jitter[op] > 0:
                x = _apply(x, p.jitter & (p.order[:, stage] == op), _JITTER_OPS[op], p.factors[:, op])
    x = _apply(x, p.gray, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    x = _apply(x, p.blur, lambda v, s: gaussian_blur(v, s, kernel_size), p.sigma)
    t = cfg.solarize_threshold
    return _apply(x, p.solarize, lambda v: torch.where(v >= t, 1.0 - v, v))


IMPLS = ("auto", "fused", "torch")


class Augmenter(nn.Module):
    """uint8 images + crop windows → normalised views, batched on the images' device.

    `impl`: "fused" runs the Triton kernels of `viewpipe.fused` (CUDA tensors; on the CPU only under
    TRITON_INTERPRET=1), "torch" the torch ops of this module (the reference, and the CPU path), "auto" the
    fused kernels on CUDA tensors when Triton is there and torch otherwise. Both draw the same parameters
    from the generator, so a seed gives the same views either way (within float rounding). `out_dtype`:
    float32 or bfloat16 views; `channels_last`: the views' memory format."""

    def __init__(self, cfg: AugmentConfig = AugmentConfig(), channels_last: bool = False, impl: str = "auto",
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
        self.cfg, self.channels_last, self.impl, self.out_dtype = cfg, channels_last, impl, out_dtype
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def fused_on(self, device: torch.device | str) -> bool:
        """Whether views on `device` go through the fused kernels."""
        if self.impl == "torch":
            return False
        from viewpipe import fused

        if self.impl == "fused":
            return True
        return torch.device(device).type == "cuda" and fused.available()

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        windows: torch.Tensor | np.ndarray | None = None,
        generator: torch.Generator | None = None,
        layout: str = "auto",
        sizes: torch.Tensor | np.ndarray | None = None,
        first_view: int = 0,
    ) -> list[torch.Tensor]:
        """images: uint8 (N,H,W,3) / (N,3,H,W) or a list of images; windows: (N, V, 4) (top, left, h, w),
        or None for one view of the whole image; `sizes` (N, 2): each image's own (height, width) when the
        batch is padded (default: the whole tensor). Returns V tensors (N, 3, size, size), view v augmented
        as view `first_view + v` (a group of views inside a multi-crop set)."""
        if not isinstance(images, torch.Tensor):
            images, layout = to_nchw(images, layout), "chw"
        N, H, W = images.shape[0], *_spatial(images, layout)
        if windows is None:
            windows = torch.tensor([0, 0, H, W]).expand(N, 1, 4)
        windows = torch.as_tensor(windows)
        if windows.ndim != 3 or windows.shape[0] != N or windows.shape[2] != 4:
            raise ValueError(f"windows must have shape (N={N}, views, 4), got {tuple(windows.shape)}")
        V, S = windows.shape[1], self.cfg.size
        if self.fused_on(images.device):
            from viewpipe import fused

            views = fused.crop_resize(images, windows, S, sizes=sizes, layout=layout, scale=1.0 / 255.0)
        else:
            x = to_nchw(images, layout)
            if sizes is not None:  # each image's edge extends it over the padding, as the fused path reads it
                x = x.clone()
                for n, (h, w) in enumerate(torch.as_tensor(sizes).tolist()):
                    x[n, :, h:, :w] = x[n, :, h - 1 : h, :w]
                    x[n, :, :, w:] = x[n, :, :, w - 1 : w]
            views = crop_resize(x, windows, S).div_(255.0).clamp_(0, 1)
        return [self.finish(views[v * N : (v + 1) * N], first_view + v, generator) for v in range(V)]

    def finish(self, x: torch.Tensor, view: int, generator: torch.Generator | None = None,
               layout: str = "chw") -> torch.Tensor:
        """Photometric augmentation of view number `view` and normalisation, for views already cropped and
        resized: (N,3,S,S) float in [0, 1], or uint8 (N,3,S,S) / (N,S,S,3) with layout="hwc" (a backend that
        crops inside its own graph hands its uint8 views over as they are). Draws the view's parameters from
        `generator` and returns a new tensor (the torch path may also change a float input in place)."""
        vcfg = self.cfg.views[view % len(self.cfg.views)]
        p = draw_params(vcfg, x.shape[0], generator)
        if self.fused_on(x.device):
            from viewpipe import fused

            return fused.photometric(x, p, vcfg, self.cfg.kernel_size, self.cfg.mean, self.cfg.std, layout=layout,
                                     out_dtype=self.out_dtype, channels_last=self.channels_last)
        if layout == "hwc":
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        y = photometric(x, p, vcfg, self.cfg.kernel_size)
        y = ((y - self.mean.to(y.device)) / self.std.to(y.device)).to(self.out_dtype)
        return y.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


def _spatial(x: torch.Tensor, layout: str) -> tuple[int, int]:
    """(H, W) of a batch in `layout` ("auto", "hwc" or "chw")."""
    return (x.shape[1], x.shape[2]) if _is_hwc(x.shape[1:], layout) else (x.shape[2], x.shape[3])
