"""Batched view augmentation, on the GPU or the CPU: `Augmenter`, the one entry point every backend calls.

It runs one of two implementations of the same function, chosen per batch by the tensors' device and `impl`:
the fused Triton kernels (`viewpipe.fused`) or the plain torch ops (`viewpipe.torch_ops`, the reference and the
CPU path). Both crop and resize from per-sample windows, then flip, jitter colour in each sample's own order,
grayscale, blur, solarize and normalise, with parameters drawn once per view from a CPU generator
(`viewpipe.augment_params`), so that a seed gives the same views either way and on any device. This module
also re-exports the configs, presets and torch ops under the names callers import them by.

Standalone use, on any uint8 batch::

    import torch
    from viewpipe.augment import Augmenter, preset
    images = torch.randint(0, 256, (8, 3, 256, 320), dtype=torch.uint8, device="cuda")  # or NHWC, or a list
    windows = torch.tensor([[0, 0, 256, 320], [32, 40, 128, 160]]).repeat(8, 1, 1)      # (N, views, 4): top, left, h, w
    aug = Augmenter(preset("mocov2", size=224))
    view1, view2 = aug(images, windows, generator=torch.Generator().manual_seed(0))  # (8, 3, 224, 224) each
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType
from typing import Sequence

import numpy as np
import torch
from torch import nn

from viewpipe import fused, torch_ops
from viewpipe.crop import CropConfig, view_windows
from viewpipe.augment_params import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, PRESET_NORMS, PRESETS,
    AugmentConfig, ViewAugment, ViewParams, draw_params, preset, spatial_size,
)
from viewpipe.torch_ops import (
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, crop_resize, gaussian_blur, grayscale,
    photometric, to_nchw,
)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "IMPLS",
    "PRESET_NORMS", "PRESETS", "AugmentConfig", "Augmenter", "ViewAugment", "ViewParams", "adjust_brightness",
    "adjust_contrast", "adjust_hue", "adjust_saturation", "crop_resize", "draw_params", "gaussian_blur",
    "grayscale", "photometric", "preset", "to_nchw",
]

IMPLS = ("auto", "fused", "torch")


class Augmenter(nn.Module):
    """uint8 images + crop windows → normalised views, batched on the images' device.

    `impl`: "fused" runs the Triton kernels of `viewpipe.fused` (CUDA tensors; on the CPU only under
    TRITON_INTERPRET=1), "torch" the torch ops of `viewpipe.torch_ops` (the reference, and the CPU path), "auto"
    the fused kernels on CUDA tensors when Triton is there and torch otherwise. Both draw the same parameters
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

    def fused_on(self, device: torch.device | str) -> bool:
        """Whether views on `device` go through the fused kernels."""
        if self.impl != "auto":
            return self.impl == "fused"
        return torch.device(device).type == "cuda" and fused.available()

    def _ops(self, device: torch.device | str) -> ModuleType:
        """The implementation for tensors on `device`: `viewpipe.fused` or `viewpipe.torch_ops`, which offer the
        same `crop_views` and `finish_view`."""
        return fused if self.fused_on(device) else torch_ops

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
        N, H, W = images.shape[0], *spatial_size(images, layout)
        if windows is None:
            windows = torch.tensor([0, 0, H, W]).expand(N, 1, 4)
        windows = torch.as_tensor(windows)
        if windows.ndim != 3 or windows.shape[0] != N or windows.shape[2] != 4:
            raise ValueError(f"windows must have shape (N={N}, views, 4), got {tuple(windows.shape)}")
        views = self._ops(images.device).crop_views(images, windows, self.cfg.size, sizes=sizes, layout=layout)
        return [self.finish(views[v * N : (v + 1) * N], first_view + v, generator) for v in range(windows.shape[1])]

    def random_views(self, images: torch.Tensor | Sequence[torch.Tensor], views: int | None = None,
                     boxes: torch.Tensor | np.ndarray | None = None, crop: CropConfig = CropConfig(),
                     generator: torch.Generator | None = None, layout: str = "auto") -> list[torch.Tensor]:
        """`views` views of each image (default 2, as a contrastive pair) with crop windows drawn here:
        RandomResizedCrop at `crop`'s scale and ratio, or, given ContrastiveCrop `boxes` (N, 4) as fractions
        (h0, w0, h1, w1), crops centred inside each box by Beta(α, α) (α = `crop.alpha`). All draws come from
        `generator`, so a seed gives the same views.

        >>> import torch
        >>> from viewpipe import Augmenter, preset
        >>> images = torch.randint(0, 256, (4, 3, 64, 80), dtype=torch.uint8)  # a uint8 batch, on any device
        >>> q, k = Augmenter(preset("mocov2", size=32)).random_views(images, generator=torch.Generator().manual_seed(0))
        >>> tuple(q.shape), q.dtype
        ((4, 3, 32, 32), torch.float32)
        """
        own = None  # a list's images keep their own sizes inside the padded batch
        if isinstance(images, torch.Tensor):
            sizes = np.tile(spatial_size(images, layout), (images.shape[0], 1))
        else:
            sizes = np.array([spatial_size(im[None], layout) for im in images]).reshape(-1, 2)
            images, layout, own = to_nchw(images, layout), "chw", torch.from_numpy(sizes)
        seed = int(torch.randint(2 ** 62, (), generator=generator))
        crop = replace(crop, use_box=boxes is not None)  # Beta centres only inside given boxes
        box_rows = None if boxes is None else np.asarray(torch.as_tensor(boxes, dtype=torch.float32).cpu())
        count = views or max(2, len(self.cfg.views))
        windows = view_windows(np.random.default_rng(seed), sizes, box_rows, count, crop)
        return self(images, torch.from_numpy(windows), generator, layout, sizes=own)

    def finish(self, x: torch.Tensor, view: int, generator: torch.Generator | None = None,
               layout: str = "chw") -> torch.Tensor:
        """Photometric augmentation of view number `view` and normalisation, for views already cropped and
        resized: (N,3,S,S) float in [0, 1], or uint8 (N,3,S,S) / (N,S,S,3) with layout="hwc" (a backend that
        crops inside its own graph hands its uint8 views over as they are). Draws the view's parameters from
        `generator` and returns a new tensor (the torch path may also change a float input in place)."""
        vcfg = self.cfg.views[view % len(self.cfg.views)]
        p = draw_params(vcfg, x.shape[0], generator)
        return self._ops(x.device).finish_view(x, p, vcfg, self.cfg.kernel_size, self.cfg.mean, self.cfg.std,
                                               layout=layout, out_dtype=self.out_dtype,
                                               channels_last=self.channels_last)
