"""The reference backend: the papers' own approach, a PyTorch DataLoader with PIL decode and torchvision
augmentations on the CPU. Every benchmark compares against it.

It has the interface of the DALI and FFCV backends (`ReferenceLoader`): the batches of
`viewpipe.pipelines.epoch_batches`, the plan of the shared `Planner` (the same windows, companions and seeds
as every backend), `set_epoch`, `state_dict` / `load_state_dict` for an exact mid-epoch resume. Data flow:

1. `EpochSampler`, iterated in the consumer's process, yields one `BatchPlan` per batch (the windows from the
   boxes in the SampleState at that moment, image sizes from the headers) when the DataLoader asks for one
   more (`workers × prefetch_factor` ahead);
2. a persistent worker builds the whole batch from it (`ReferenceBatches.__getitem__`): PIL decode (once per
   image, companions included), the crops resized by PIL and augmented by torchvision under the plan's torch
   seed, and the batch collated;
3. the consumer hands the batches out through `Loader.hand_out` (position, overlap).

Unlike the official ContrastiveCrop code, boxes are read live for every batch, so updates reach persistent
workers too (the official code needs its workers re-created).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from viewpipe.augment import AugmentConfig, ViewAugment
from viewpipe.errors import ViewpipeError
from viewpipe.formats import decode_errors, open_image
from viewpipe.pipelines.base import Batch, Loader, Samples, register
from viewpipe.pipelines.config import LoaderConfig
from viewpipe.pipelines.plan import BatchPlan, Planner, sample_check
from viewpipe.sources import ImageSizes, Source, open_source


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


def clean_image(img: Any, size: int, resize: int = 0) -> Any:
    """A clean view as the papers' code makes it from a PIL image: size×size ignoring the aspect ratio
    (bilinear, antialiased when shrinking), or with `resize > 0` the shorter side to `resize` then the centre
    size×size crop (torchvision's Resize + CenterCrop)."""
    from PIL import Image

    if resize <= 0:
        return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(img, resize, TF.InterpolationMode.BILINEAR, antialias=True), [size, size])


class Unusable(dict):
    """What a worker returns instead of a batch when some of its images cannot be used (index → why): the
    consumer replaces them from now on and asks for the batch again."""


class EpochSampler(Sampler):
    """The plans of one pass's batches, from batch `start` of `batches` on. Iterated in the consumer's
    process: the DataLoader takes the next plan (`Planner.plan`: windows from the boxes as they are now,
    companions) each time the consumer receives a batch, and a worker builds that batch, so the loader's
    position and the live-state bound follow from the consumer alone."""

    def __init__(self, planner: Planner) -> None:
        self.epoch, self.start, self.planner = 0, 0, planner
        self.batches: list[np.ndarray] = []

    def set(self, epoch: int, start: int, batches: list[np.ndarray]) -> None:
        """What the next pass yields: batches `start`.. of `epoch`."""
        self.epoch, self.start, self.batches = epoch, start, batches

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __iter__(self) -> Iterator[BatchPlan]:
        epoch, start, batches = self.epoch, self.start, self.batches
        for b in range(start, len(batches)):
            yield self.planner.plan(epoch, b, batches[b])


class ReferenceBatches(Dataset):
    """A map-style dataset whose items are whole batches: `self[plan]` decodes the plan's images with PIL
    (each once), cuts and resizes each view's window with PIL and augments it with torchvision under the
    plan's torch seed (a clean view: `clean_image`, exactly the papers' transform). Returns a `Batch`, or
    `Unusable` when an image does not decode."""

    def __init__(self, source: Source, cfg: LoaderConfig) -> None:
        self.source, self.cfg = source, cfg
        self.labels = np.asarray(source.labels, dtype=np.int64)
        self.group, self.sizes = cfg.group_of_views(), cfg.view_sizes()
        self.groups = cfg.groups_of_views()
        augs = [cfg.group_augment(self.group[v]) for v in range(cfg.views)]  # (a group may have its own views)
        self.transforms = [torchvision_view_transform(a.views[v % len(a.views)], a) for v, a in enumerate(augs)]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, plan: BatchPlan) -> Batch | Unusable:
        V = self.cfg.views
        decoded: dict[int, Any] = {}
        unusable = Unusable()
        groups = [plan.indices] + ([] if plan.neighbours is None else [plan.neighbours])
        for k in np.concatenate(groups).tolist():
            if k not in decoded:
                try:
                    decoded[k] = open_image(self.source.read(k))
                except decode_errors() as exc:
                    unusable[k] = f"fails to decode ({exc})"
        if unusable:
            return unusable
        # torchvision draws from torch's global generator: seed it per batch, and restore it afterwards so that
        # a loader without workers leaves the caller's random stream as it was
        views = []
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(plan.seed)
            for v in range(plan.windows.shape[1]):
                tf, group = self.transforms[v % V], groups[v // V]
                views.append(torch.stack([tf(self.cut(decoded[k], win, v % V))
                                          for k, win in zip(group.tolist(), plan.windows[:, v].tolist())]))
        return Batch(views, torch.from_numpy(self.labels[plan.indices]), torch.from_numpy(plan.indices),
                     None if plan.neighbours is None else torch.from_numpy(plan.neighbours),
                     torch.from_numpy(plan.windows))

    def cut(self, img: Any, window: list[int], v: int) -> Any:
        """View v's crop of a PIL image, resized by PIL: `window` (top, left, h, w), or a clean view's transform."""
        from PIL import Image

        group, S = self.groups[v], self.sizes[v]
        if group.clean:
            return clean_image(img, S, group.resize)
        top, left, h, w = window
        return img.resize((S, S), Image.BILINEAR, box=(left, top, left + w, top + h))


def _as_is(batch: tuple) -> tuple:
    """The DataLoader's collate function: a `ReferenceBatches` item is already a batch."""
    return batch


@register("torch")
class ReferenceLoader(Loader):
    """`Loader` of the papers' way, on the CPU workers of a DataLoader (see the module): `cfg.workers`
    persistent worker processes (0: in this process). A box or neighbour update published after the consumer
    received batch u is used by every batch from u + `prefetch` on (`prefetch = workers × prefetch_factor +
    1`: the batches already handed to workers, plus the one handed out when batch u was received; 1 without
    workers; one more with overlap). `cfg.device`: where the views are handed over; with overlap, batch b + 1
    is copied there on a side stream while the consumer has batch b."""

    is_reference = True

    def open(self, source: str | os.PathLike[str] | Source) -> Samples:
        source = open_source(source, self.cfg.split) if isinstance(source, (str, os.PathLike)) else source
        if self.cfg.reference.prefetch_factor < 1:
            raise ViewpipeError(f"prefetch_factor must be at least 1, got {self.cfg.reference.prefetch_factor}")
        self.source, self.workers = source, max(0, int(self.cfg.workers))
        sizes = ImageSizes(source)
        return Samples(len(source), sizes, source.describe, sample_check(source, sizes))

    def planned_ahead(self) -> int:
        return self.workers * self.cfg.reference.prefetch_factor + 1

    def __init__(self, source: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(), state: Any = None,
                 *, rank: int | None = None, world: int | None = None) -> None:
        super().__init__(source, cfg, state, rank=rank, world=world)
        self.dataset, self.sampler = self.make_dataset(), EpochSampler(self.planner)
        factor = cfg.reference.prefetch_factor
        self._loader = DataLoader(
            self.dataset, batch_size=None, sampler=self.sampler, collate_fn=_as_is, num_workers=self.workers,
            persistent_workers=self.workers > 0, prefetch_factor=factor if self.workers else None,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),  # (the DataLoader's worker seeds: not from the caller's global RNG)
        )

    def make_dataset(self) -> Dataset:
        """What the workers make each planned batch with."""
        return ReferenceBatches(self.source, self.cfg)

    def pending(self) -> Iterator[tuple[int, Callable[[], tuple]]]:
        """(b, the function that moves batch b to the loader's device) for the rest of the epoch."""
        epoch, batches, b = self.epoch, self.batches(), self._next
        if b >= len(batches):
            return
        self.sampler.set(epoch, b, batches)
        it = iter(self._loader)  # (persistent workers: the same workers, their queues drained)
        while b < len(batches):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"the DataLoader ended at batch {b} of {len(batches)}") from None
            if isinstance(batch, Unusable):  # replace them from now on, and ask for this batch again
                self.replace_unusable(dict(batch))
                self.sampler.set(epoch, b, batches)
                it = iter(self._loader)
                continue
            expected = self.substitutes(batches[b])
            if not np.array_equal(batch.indices.numpy(), expected):  # a batch out of place: a bug
                raise RuntimeError(f"batch {b} holds samples {batch.indices.tolist()}, expected {expected.tolist()}")
            yield b, partial(self._to_device, batch)
            b += 1

    def replace_unusable(self, unusable: dict[int, str]) -> None:
        """Samples a worker could not use (index → why): replaced from now on (`Substitutes`)."""
        self.substitutes.add(unusable)

    def _to_device(self, batch: Batch) -> Batch:
        """The batch's views on the loader's device, in the configured dtype and memory format."""
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        dtype = getattr(torch, self.cfg.dtype)
        if batch.views is None:  # (a decode-only batch)
            return batch
        return batch._replace(views=[v.to(self.device, dtype, non_blocking=True).contiguous(memory_format=fmt)
                                     for v in batch.views])

    def close(self) -> None:
        """Stop the persistent workers (they stop with the loader anyway; this frees them now)."""
        it, self._loader._iterator = self._loader._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

