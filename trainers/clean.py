"""Clean-image passes over a whole dataset: no augmentation, every sample once, in dataset order.

Shared by everything that needs the model's view of the *whole* dataset: the kNN monitor (train bank and
test set), the linear probe's test set, the ContrastiveCrop box update (`trainers/ccrop.py`) and CsMl's
neighbour mining. Each image is decoded with PIL (`decode_rgb`: EXIF orientation, RGB) and resized to
size×size ignoring its aspect ratio (bilinear, antialiased when shrinking: PIL's filter, as torchvision's
`Resize((s, s))` on a PIL image), which is how ContrastiveCrop's code prepares ImageNet for its box pass and,
at the native side, the identity for small datasets. `resize > 0` gives instead the ImageNet linear-probe
test transform (shorter side to `resize`, then the centre size×size crop). How a pass reads the dataset is
one `CleanOptions`.

Under torch.distributed each rank takes the strided share `indices[rank::world]` and `dataset_outputs`
gathers the shares back into dataset order on every rank.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from viewpipe.augment import IMAGENET_MEAN, IMAGENET_STD
from viewpipe.errors import ViewpipeError
from viewpipe.dist import gather_rows, is_on, rank_world
from viewpipe.sources import Source, open_source

_WORKER_ERROR = re.compile(r"^viewpipe\.[\w.]*Error: (.*)$")


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class CleanOptions:
    """How a pass over the whole dataset reads it: the clean images (`size`, `resize`, `mean`, `std`), how they
    are batched (`batch_size` per rank, `workers`), where `fn` runs (`device`), the split a dataset given as a
    path is opened with, and whether rank 0 shows a progress bar. Built once by the caller (the Trainer from
    its config, `LinearConfig.clean_options`, `viewpipe eval` from its arguments) and handed down unchanged:
    knn_accuracy → pooled_features → dataset_outputs → clean_loader → CleanLoader → CleanDataset. A pass that
    differs in one setting takes a copy (`dataclasses.replace(options, resize=256)`)."""

    size: int  # side of the clean images
    resize: int = 0  # 0: size×size ignoring the aspect ratio; > 0: shorter side to this, then the centre crop
    batch_size: int = 256  # per rank
    workers: int = field(default_factory=default_workers)  # DataLoader worker processes
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    split: str = "train"
    device: torch.device | str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ViewpipeError(f"clean image size must be positive, got {self.size}")


def as_source(data: Source | str | os.PathLike[str], split: str = "train") -> Source:
    """A Source as given, or the one `open_source(path, split)` opens."""
    return open_source(data, split) if isinstance(data, (str, os.PathLike)) else data


def clean_image(img: Any, size: int, resize: int = 0) -> Any:
    """The clean PIL image: size×size ignoring aspect ratio (bilinear, antialiased), or with `resize > 0`
    the shorter side to `resize` then the centre size×size crop (torchvision's Resize + CenterCrop)."""
    from PIL import Image

    if resize <= 0:
        return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(img, resize, TF.InterpolationMode.BILINEAR, antialias=True), [size, size])


def to_normalised(img: Any, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A PIL RGB image → float32 (3, H, W), scaled to [0, 1] then normalised with mean/std (3, 1, 1)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return x.sub_(mean).div_(std)


class CleanDataset(Dataset):
    """Items (image (3, size, size) float32 normalised, label, sample index) for the given sample indices,
    prepared as `options` say (size, resize, mean, std)."""

    def __init__(self, source: Source, indices: np.ndarray, options: CleanOptions) -> None:
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.size, self.resize = options.size, options.resize
        self.mean = torch.tensor(options.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(options.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from viewpipe.formats import decode_rgb

        index = int(self.indices[i])
        img = decode_rgb(self.source.read(index), self.source.describe(index))
        img = clean_image(img, self.size, self.resize)
        return to_normalised(img, self.mean, self.std), int(self.source.labels[index]), index


def one_line(exc: BaseException) -> ViewpipeError | None:
    """A viewpipe error a DataLoader worker re-raised with its traceback, as the one-line error it was."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    match = _WORKER_ERROR.match(lines[-1]) if lines else None
    if match:
        return ViewpipeError(match.group(1))
    return exc if isinstance(exc, ViewpipeError) and len(lines) <= 1 else None


def one_line_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """`batches` (a DataLoader), with a viewpipe error that a worker re-raised with its traceback turned back
    into its one line."""
    try:
        yield from batches
    except Exception as exc:  # a worker's error arrives with its traceback in the message
        if (err := one_line(exc)) is not None and err is not exc:
            raise err from None
        raise


class CleanLoader:
    """Batches (images (B, 3, size, size) float32, labels (B,) int64, indices (B,) int64) of this rank's
    share of the dataset, in dataset order. `len()` is the number of batches, `indices` the share."""

    def __init__(self, source: Source, options: CleanOptions, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.indices = np.arange(len(source), dtype=np.int64)[rank::world]
        self.dataset = CleanDataset(source, self.indices, options)
        self.loader = DataLoader(self.dataset, batch_size=max(1, options.batch_size), shuffle=False,
                                 drop_last=False, num_workers=options.workers, pin_memory=torch.cuda.is_available())

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return one_line_errors(self.loader)


def clean_loader(data: Source | str | os.PathLike[str], options: CleanOptions, rank: int | None = None,
                 world: int | None = None) -> CleanLoader:
    """Clean batches (images, labels, indices) of `indices[rank::world]` of dataset order, not shuffled
    (`data` as a path: opened with `options.split`). rank/world default to torch.distributed's (else 0 of 1);
    a decode failure is the one-line error naming the file that `decode_rgb` gives, also from a worker."""
    rank, world = rank_world(rank, world)
    return CleanLoader(as_source(data, options.split), options, rank, world)


class eval_mode:
    """Puts a module in eval mode for a clean pass and restores its previous mode on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was = module, module.training

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was)


def dataset_outputs(fn: Callable[[torch.Tensor], torch.Tensor], data: Source | str | os.PathLike[str],
                    options: CleanOptions, rank: int | None = None, world: int | None = None,
                    desc: str = "clean pass") -> torch.Tensor:
    """`fn(images)` under `torch.no_grad()` for every sample: a tensor (N, ...) with row i for sample i of the
    whole dataset, on `options.device`, on every rank. `fn` gets this rank's clean batches (`options`) on that
    device and may return (B, ...) of any shape and dtype. Under torch.distributed the ranks' shares are
    gathered back into place (every rank must call it); without it, `world > 1` is an error since the other
    shares cannot be had."""
    from tqdm import tqdm

    device = torch.device(options.device)
    source = as_source(data, options.split)
    rank, world = rank_world(rank, world)
    if world > 1 and not is_on():
        raise ViewpipeError(f"dataset_outputs: world size {world} without torch.distributed initialised; "
                            "call it from every rank after init_process_group (or use clean_loader for one share)")
    loader = clean_loader(source, options, rank, world)
    outs: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    bar = tqdm(loader, desc=desc, unit="batch", disable=None if options.progress and rank == 0 else True)
    with torch.no_grad():
        for images, _, indices in bar:
            out = fn(images.to(device, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or len(out) != len(images):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ViewpipeError(f"dataset_outputs: fn must return one row per image ({len(images)}), got {got}")
            outs.append(out.detach())
            seen.append(indices)
    local = torch.cat(outs) if outs else None
    if seen and not torch.equal(torch.cat(seen), torch.from_numpy(loader.indices)):
        raise ViewpipeError("dataset_outputs: the loader returned samples out of order")  # a broken invariant
    if world == 1 and local is None:
        raise ViewpipeError(f"dataset_outputs: the dataset is empty ({len(source)} samples)")
    return gather_rows(local, len(source), device, rank, world)
