"""The augmentation as a per-sample transform: `ViewTransform`, one image → its views, for a user's own
`Dataset.__getitem__` or a torchvision `Compose`. It runs the loaders' own crop sampler and augmenter on one
image, so a user's pipeline gets the same views as viewpipe's loaders (batched GPU use: `Augmenter`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from viewpipe.augment import Augmenter
from viewpipe.augment_params import AugmentConfig, preset
from viewpipe.crop import CropConfig


def image_tensor(image: Any) -> torch.Tensor:
    """A PIL image, an (H, W[, C]) NumPy array or a (C, H, W) tensor (torchvision's layout; uint8, or float in
    [0, 1]) as a (3, H, W) uint8 tensor: grayscale repeated, alpha dropped."""
    from torchvision.transforms.v2 import functional as F

    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    x = F.to_image(image).as_subclass(torch.Tensor)
    if x.dtype != torch.uint8:
        x = F.to_dtype(x, torch.uint8, scale=True)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image (C, H, W) with 1, 3 or 4 channels, got shape {tuple(x.shape)}")
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]


class ViewTransform(nn.Module):
    """One image → `views` augmented views (a list of (3, size, size) tensors), with RandomResizedCrop windows
    drawn inside it, or ContrastiveCrop's when the caller gives the image's box. Randomness: a `seed` gives
    reproducible views (DataLoader workers each draw their own: the worker's id is mixed in); without one the
    draws come from torch's global generator, which DataLoader seeds per worker.

    >>> import torch
    >>> from torchvision.transforms import v2
    >>> from viewpipe import ViewTransform
    >>> transform = v2.Compose([v2.ToImage(), ViewTransform("mocov2", size=32)])
    >>> q, k = transform(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8))
    >>> tuple(q.shape)
    (3, 32, 32)
    >>> q, k = ViewTransform("mocov2", size=32)(torch.zeros(3, 48, 64), box=(0.1, 0.2, 0.6, 0.9))  # ContrastiveCrop
    """

    def __init__(self, augment: str | AugmentConfig = "mocov2", size: int = 224, views: int | None = None,
                 crop: CropConfig = CropConfig(), seed: int | None = None, out_dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> None:
        """Args:
            augment: a preset's name (`viewpipe.augment.PRESETS`) or an AugmentConfig.
            size: the views' side (a preset's size; an AugmentConfig keeps its own).
            views: views per image (default 2: a contrastive pair).
            crop: the crop sampling: scale, ratio, tries, and α of ContrastiveCrop's Beta when a box is given.
            seed: a fixed seed for reproducible views (default: torch's global generator).
            out_dtype: float32 or bfloat16 views.
            channels_last: the views' memory format.
        """
        super().__init__()
        cfg = preset(augment, size=size) if isinstance(augment, str) else augment
        self.augmenter = Augmenter(cfg, channels_last=channels_last, out_dtype=out_dtype)
        self.views, self.crop, self.seed = views or max(2, len(cfg.views)), crop, seed
        self._generator: torch.Generator | None = None
        self._worker: int | None = None

    def generator(self) -> torch.Generator:
        """This process's generator: seeded from (`seed`, DataLoader worker id), or from torch's global one."""
        if self.seed is None:
            return torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if self._generator is None or self._worker != worker:
            seed = np.random.SeedSequence([self.seed, worker + 1]).generate_state(1, np.uint64)[0]
            self._generator, self._worker = torch.Generator().manual_seed(int(seed) >> 1), worker
        return self._generator

    def forward(self, image: Any, box: Any = None) -> list[torch.Tensor]:
        """The views of `image` (PIL, NumPy or a tensor: `image_tensor`); `box`: its ContrastiveCrop box
        (h0, w0, h1, w1) as fractions of the image, or None for RandomResizedCrop."""
        x = image_tensor(image)[None]
        boxes = None if box is None else torch.as_tensor(box, dtype=torch.float32).reshape(1, 4)
        views = self.augmenter.random_views(x, self.views, boxes, self.crop, self.generator(), layout="chw")
        return [v[0] for v in views]

    def extra_repr(self) -> str:
        return f"views={self.views}, size={self.augmenter.cfg.size}, crop={self.crop}, seed={self.seed}"
