"""Clean-image passes over a whole dataset: no augmentation, every sample once, in dataset order.

Shared by everything that needs the model's view of the *whole* dataset: the kNN monitor (train bank and
test set), the linear probe's features, the ContrastiveCrop box update (`trainers/ccrop.py`) and CsMl's
neighbour mining. A pass reads the data through the run's own backend (`CleanOptions.backend`): the same
`Loader` as training, asked for one clean view per sample in dataset order (`CleanOptions.loader_config`:
the whole image resized to size×size ignoring its aspect ratio, antialiased — how ContrastiveCrop's code
prepares ImageNet for its box pass — or with `resize > 0` the linear-probe protocol's shorter side to
`resize` and centre crop). So DALI decodes with nvJPEG, FFCV with its decoder, the memory backend reuses
the device copy it holds, and the reference backend decodes and resizes with PIL, exactly the papers' transform.
A backend that cannot read a source as it is (FFCV and a test set that was never converted) hands the pass
to the reference backend. The forward runs under bf16 autocast with `amp`, on channels_last views with
`channels_last`, as the trainer's does.

Under torch.distributed each rank takes the strided share `indices[rank::world]` and `dataset_outputs`
gathers the shares back into dataset order on every rank. A sample that cannot be used is reported on one
line and its row computed from the next usable sample, as training replaces it (`Substitutes`).
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
from viewpipe.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from viewpipe.augment_params import CLEAN_VIEW
from viewpipe.crop import CropConfig
from viewpipe.dist import gather_rows, is_on, rank_world
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import Loader, LoaderConfig, ViewGroup, backends, get_backend
from viewpipe.sources import Source, open_source

_WORKER_ERROR = re.compile(r"^viewpipe\.[\w.]*Error: (.*)$")


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class CleanOptions:
    """How a pass over the whole dataset reads it: the clean images (`size`, `resize`, `mean`, `std`), the
    backend that reads them (`backend`, a registered name: the run's own) with its `workers`, how they are
    batched (`batch_size` per rank), where and how `fn` runs (`device`; `amp`: bf16 views and autocast;
    `channels_last` views), the split a dataset given as a path is opened with, and whether rank 0 shows a
    progress bar. Built once by the caller (the Trainer from its config, `LinearConfig.clean_options`,
    `viewpipe eval` from its arguments) and handed down unchanged: knn_accuracy → pooled_features →
    dataset_outputs → clean_loader. A pass that differs in one setting takes a copy
    (`dataclasses.replace(options, resize=256)`)."""

    size: int  # side of the clean images
    resize: int = 0  # 0: size×size ignoring the aspect ratio; > 0: shorter side to this, then the centre crop
    batch_size: int = 256  # per rank
    workers: int = field(default_factory=default_workers)  # the backend's workers (threads or processes)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    split: str = "train"
    device: torch.device | str = "cpu"
    progress: bool = True
    backend: str = "torch"  # the registered backend that reads the data (`viewpipe.pipelines.backends()`)
    amp: bool = False  # bf16 views and the forward under bf16 autocast
    channels_last: bool = False  # the views' memory format

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ViewpipeError(f"clean image size must be positive, got {self.size}")

    def loader_config(self) -> LoaderConfig:
        """The loader's config of this pass: one clean view per sample (`ViewGroup(clean=True)`), no
        photometric change, every sample once in dataset order (no shuffle, no drop_last)."""
        return LoaderConfig(
            views=1, batch_size=max(1, self.batch_size), crop=CropConfig(use_box=False),
            augment=AugmentConfig(self.size, (CLEAN_VIEW,), tuple(self.mean),  # type: ignore[arg-type]
                                  tuple(self.std)),
            workers=self.workers, shuffle=False, drop_last=False, groups=(ViewGroup(1, self.size, clean=True,
                                                                                   resize=self.resize),),
            dtype="bfloat16" if self.amp else "float32", channels_last=self.channels_last, device=str(self.device),
            split=self.split)


def as_source(data: Source | str | os.PathLike[str], split: str = "train") -> Source:
    """A Source as given, or the one `open_source(path, split)` opens."""
    return open_source(data, split) if isinstance(data, (str, os.PathLike)) else data


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


def clean_loader(data: Source | str | os.PathLike[str], options: CleanOptions, rank: int | None = None,
                 world: int | None = None) -> Loader:
    """The `Loader` of a clean pass: `Batch`es of one clean view (`options.loader_config()`) of
    `indices[rank::world]` of dataset order, through `options.backend` (the reference backend where that one
    cannot read `data`; `data` as a path: opened with `options.split`). rank/world default to
    torch.distributed's (else 0 of 1)."""
    source = as_source(data, options.split)
    cls = get_backend(options.backend)
    if not cls.can_read(source):
        cls = next(c for c in backends().values() if c.is_reference)
    return cls(source, options.loader_config(), rank=rank, world=world)


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
    """`fn(images)` under `torch.no_grad()` (and bf16 autocast with `options.amp`) for every sample: a tensor
    (N, ...) with row i for sample i of the whole dataset, on `options.device`, on every rank. `fn` gets this
    rank's clean batches (`clean_loader`) on that device and may return (B, ...) of any shape and dtype. Under
    torch.distributed the ranks' shares are gathered back into place (every rank must call it); without it,
    `world > 1` is an error since the other shares cannot be had."""
    device = torch.device(options.device)
    source = as_source(data, options.split)
    rank, world = rank_world(rank, world)
    if world > 1 and not is_on():
        raise ViewpipeError(f"dataset_outputs: world size {world} without torch.distributed initialised; "
                            "call it from every rank after init_process_group (or use clean_loader for one share)")
    with clean_loader(source, options, rank, world) as loader:
        local, seen = _share_outputs(fn, loader, device, options, f"{desc} ({loader.name})" if rank == 0 else desc)
        share = loader.substitutes(np.arange(len(source), dtype=np.int64)[rank::world])
    if not np.array_equal(seen, share):
        raise ViewpipeError("dataset_outputs: the loader returned samples out of order")  # a broken invariant
    if world == 1 and local is None:
        raise ViewpipeError(f"dataset_outputs: the dataset is empty ({len(source)} samples)")
    return gather_rows(local, len(source), device, rank, world)


def _share_outputs(fn: Callable[[torch.Tensor], torch.Tensor], loader: Loader, device: torch.device,
                   options: CleanOptions, desc: str) -> tuple[torch.Tensor | None, np.ndarray]:
    """`fn` of every clean batch of this rank's share: the rows (None for an empty share) and the samples
    they came from."""
    from tqdm import tqdm

    outs: list[torch.Tensor] = []
    seen: list[np.ndarray] = []
    bar = tqdm(loader, desc=desc, unit="batch", disable=None if options.progress and loader.rank == 0 else True)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=options.amp):
        for batch in bar:
            images = batch.views[0]
            out = fn(images.to(device, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or len(out) != len(images):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ViewpipeError(f"dataset_outputs: fn must return one row per image ({len(images)}), got {got}")
            outs.append(out.detach())
            seen.append(batch.indices.numpy())
    return (torch.cat(outs) if outs else None), np.concatenate(seen) if seen else np.zeros(0, np.int64)
