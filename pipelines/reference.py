"""The reference backend: the papers' own approach, a PyTorch DataLoader with PIL decode and torchvision
augmentations on the CPU. Every benchmark compares against it.

Unlike the official ContrastiveCrop code, boxes are read live from the SampleState for every sample, so
updates reach workers with `persistent_workers=True` too (the official code needs workers re-created).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from viewpipe.augment import AugmentConfig, ViewAugment
from viewpipe.crop import view_windows
from viewpipe.errors import ViewpipeError
from viewpipe.formats import open_image
from viewpipe.pipelines import LoaderConfig
from viewpipe.sources import Source
from viewpipe.state import SampleState

def decode_rgb(data: bytes, where: str):  # noqa: ANN201  (PIL.Image.Image)
    """Decode to RGB with EXIF orientation applied (the policy of every loader, see viewpipe.formats),
    or one clear error naming `where`."""
    from PIL import Image, UnidentifiedImageError

    try:
        return open_image(data)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ViewpipeError(f"{where}: cannot decode image ({exc}); fix or remove the file") from None


def torchvision_view_transform(view: ViewAugment, cfg: AugmentConfig):  # noqa: ANN201  (a torchvision transform)
    """The photometric part of one view as torchvision CPU transforms on a PIL image (the papers' code)."""
    from torchvision import transforms as T

    steps: list[Any] = [T.RandomHorizontalFlip(view.flip)]
    if view.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p))
    if view.grayscale > 0:
        steps.append(T.RandomGrayscale(view.grayscale))
    if view.blur > 0:
        steps.append(T.RandomApply([T.GaussianBlur(cfg.kernel_size, view.blur_sigma)], p=view.blur))
    if view.solarize > 0:
        steps.append(T.RandomSolarize(int(view.solarize_threshold * 256), p=view.solarize))
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


class ReferenceDataset(Dataset):
    """N augmented views per sample: PIL decode once, ContrastiveCrop windows from the live SampleState,
    torchvision augmentations. Items are (views, label, index[, windows])."""

    def __init__(
        self,
        source: Source,
        cfg: LoaderConfig = LoaderConfig(),
        state: SampleState | None = None,
        return_windows: bool = False,
    ) -> None:
        if state is not None and len(state) != len(source):
            raise ViewpipeError(f"sample state {state.name!r} has {len(state)} rows but the data has {len(source)} samples")
        self.source, self.cfg, self.state, self.return_windows = source, cfg, state, return_windows
        views = cfg.augment.views
        self.transforms = [torchvision_view_transform(views[v % len(views)], cfg.augment) for v in range(cfg.views)]
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.source)

    def rng(self) -> np.random.Generator:
        """A generator per process, seeded from torch's per-worker seed (which differs per worker and epoch)."""
        if self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed())
            self._rng_pid = os.getpid()
        return self._rng  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple:
        from PIL import Image

        img = decode_rgb(self.source.read(index), self.source.describe(index))
        V, S = self.cfg.views, self.cfg.augment.size
        use_box = self.state is not None and self.cfg.crop.use_box
        box = self.state.boxes(np.array([index])) if use_box else None
        windows = view_windows(self.rng(), [[img.height, img.width]], box, V, self.cfg.crop)[0]
        views = []
        for (top, left, h, w), tf in zip(windows.tolist(), self.transforms):
            crop = img.resize((S, S), Image.BILINEAR, box=(left, top, left + w, top + h))
            views.append(tf(crop))
        item = (views, int(self.source.labels[index]), index)
        return item + (torch.from_numpy(windows),) if self.return_windows else item


class DecodeDataset(Dataset):
    """Read and decode only: the CPU decode ceiling that `viewpipe bench` reports beside the loaders."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, int]:
        img = decode_rgb(self.source.read(index), self.source.describe(index))
        return img.height, img.width


def reference_loader(
    source: Source,
    cfg: LoaderConfig = LoaderConfig(),
    state: SampleState | None = None,
    return_windows: bool = False,
) -> DataLoader:
    """A DataLoader of batches ([view tensors (B,3,S,S)], labels, indices[, windows]) with persistent workers."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        ReferenceDataset(source, cfg, state, return_windows),
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        drop_last=cfg.drop_last,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )
