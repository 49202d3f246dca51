"""The memory backend, for datasets that fit on the device (CIFAR-10: 50,000 × 32 × 32 × 3 bytes = 150 MB):
every image decoded once, when the loader is made, into one uint8 tensor on the device; then per batch the
planned samples are gathered, their windows cut and resized and their views augmented there (the fused kernels
on a GPU) — no decode per epoch and no host round trip.

Data flow per batch: the shared `Planner` (samples, companions, windows from the live boxes, the photometric
seed) → `images[indices]` on the device → `ViewFinisher.crop_and_finish` (crop-resize and augmentation of each
view group) → `Loader.hand_out` (one batch ahead on a side CUDA stream). Images of different sizes are
padded to the largest by repeating their last row and column, so a crop never sees the padding.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch

from viewpipe.errors import ViewpipeError
from viewpipe.formats import open_image
from viewpipe.pipelines.base import Batch, Loader, Samples, register
from viewpipe.pipelines.plan import BatchPlan
from viewpipe.sources import Source, open_source


def _decode(source: Source, k: int) -> np.ndarray | str:
    """Sample k as (H, W, 3) uint8 RGB (EXIF applied), or why it does not decode."""
    try:
        return np.asarray(open_image(source.read(k)))
    except Exception as exc:  # noqa: BLE001  (any decoder error: the sample is replaced and reported)
        return f"fails to decode ({exc})"


def decode_all(source: Source, threads: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Every image of `source` decoded once, in `threads` threads: (N, Hmax, Wmax, 3) uint8 with each image's
    last row and column repeated over the padding, its (N, 2) sizes, and the samples that cannot be used
    (they do not decode, or their bytes differ from the conversion's checksums)."""
    from tqdm import tqdm

    n = len(source)
    check = getattr(source, "damaged", None)  # a converted dataset's checksums, where it has them
    damaged = check(np.arange(n)) if check is not None else {}
    with ThreadPoolExecutor(max(1, threads)) as pool:  # (PIL releases the GIL while it decodes)
        work = (lambda k: damaged[k] if k in damaged else _decode(source, k))  # noqa: E731
        decoded = list(tqdm(pool.map(work, range(n), chunksize=256), total=n, unit="img",
                            desc="decoding into memory", disable=not progress or None, leave=False))
    failed = {k: d for k, d in enumerate(decoded) if isinstance(d, str)}
    if len(failed) == n:
        raise ViewpipeError(f"no image of the dataset decodes ({failed[0]}); check the data")
    sizes = np.array([d.shape[:2] if not isinstance(d, str) else (1, 1) for d in decoded], dtype=np.int64)
    H, W = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    images = np.empty((n, H, W, 3), dtype=np.uint8)
    for k, d in enumerate(decoded):
        if isinstance(d, str):
            images[k] = 0
            continue
        h, w = d.shape[:2]
        images[k, :h, :w] = d
        images[k, h:, :w] = d[h - 1 : h]
        images[k, :, w:] = images[k, :, w - 1 : w]
    return images, sizes, failed


def _memory_limit(device: torch.device) -> int:
    """How many bytes the decoded dataset may take: 80% of the device's free memory (the host's available
    memory on the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        return int(0.8 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 1 << 62


# Each Source's decoded dataset per device, kept while the Source lives, so that every loader over the same
# Source (the training loader, the passes over the whole dataset) shares one decode and one device copy.
_RESIDENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resident(source: Source, device: torch.device, threads: int) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
    """`source` decoded on `device` (`decode_all`, checked against its memory): the images, their sizes and the
    samples that cannot be used; decoded once per Source and device."""
    held = _RESIDENT.setdefault(source, {})
    if device not in held:
        images, sizes, failed = decode_all(source, threads)
        if images.nbytes > _memory_limit(device):
            raise ViewpipeError(f"the decoded dataset takes {images.nbytes / 2**30:.1f} GiB, more than the "
                                f"{device} can hold; use the dali or ffcv backend")
        held[device] = (torch.from_numpy(images).to(device), sizes, failed)
    return held[device]


@register("memory")
class MemoryLoader(Loader):
    """`Loader` over a dataset decoded once into device memory (see the module). `source`: a converted
    dataset, an image folder or a .npz (`viewpipe.sources.open_source`, split `cfg.split`); decoded at start
    in `cfg.workers` threads, once per Source object and device (`resident`: loaders over the same Source, such
    as a run's training loader and its passes over the whole dataset, share the device copy). A box or
    neighbour update is used from the `prefetch`-th batch after it (1, plus one with overlap). Samples that do
    not decode are replaced for the whole run and reported."""

    def open(self, source: str | os.PathLike[str] | Source) -> Samples:
        source = open_source(source, self.cfg.split) if isinstance(source, (str, os.PathLike)) else source
        self.images, self.sizes, failed = resident(source, self.device, self.cfg.workers)
        self.labels = torch.from_numpy(np.array(source.labels, dtype=np.int64))
        return Samples(len(source), lambda k: self.sizes[k], source.describe, failed=failed)

    def planned_ahead(self) -> int:
        return 1  # planned when the consumer asks for it

    def pending(self) -> Iterator[tuple[int, Callable[[], Batch]]]:
        epoch, batches = self.epoch, self.batches()
        for b in range(self._next, len(batches)):
            yield b, partial(self._batch, self.planner.plan(epoch, b, batches[b]))

    def _batch(self, plan: BatchPlan) -> Batch:
        """The batch of `plan`: its images gathered on the device, cut and augmented there."""
        V = self.cfg.views
        gen = torch.Generator().manual_seed(plan.seed)
        groups = [plan.indices] + ([] if plan.neighbours is None else [plan.neighbours])
        views = []
        for i, indices in enumerate(groups):
            x = self.images.index_select(0, torch.from_numpy(indices).to(self.device, non_blocking=True))
            h, w = (int(s) + 1 for s in self.sizes[indices].max(0))  # the batch's largest image + the repeated edge
            views += self.finisher.crop_and_finish(x[:, :h, :w], plan.windows[:, i * V : (i + 1) * V], gen, "hwc")
        return Batch(views, self.labels[plan.indices], torch.from_numpy(plan.indices),
                     None if plan.neighbours is None else torch.from_numpy(plan.neighbours),
                     torch.from_numpy(plan.windows))
