"""`Loader`, the base class of every backend, and the backend registry. The base owns what every backend
shares — rank and world, device, the state check, substitutes for unusable samples, the `Planner`, overlap
and position, view finishing, resume — so that a backend only opens its data and reads, decodes and cuts the
batches the planner decides (`open`, `planned_ahead`, `pending`). Every loader is built the same way,
`Backend(source, cfg, state=None, *, rank=None, world=None)`, and yields `Batch`es."""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, TypeVar

import numpy as np

from viewpipe.dist import rank_world
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines.config import LoaderConfig
from viewpipe.pipelines.finish import ViewFinisher
from viewpipe.pipelines.plan import Planner, Substitutes, check_state
from viewpipe.pipelines.position import EpochPosition, resolve_overlap


class Batch(NamedTuple):
    """What every backend yields, read by name: V views (B, 3, S, S) (2V with companions: views[:V] of the
    samples, views[V:] of one neighbour each, view V + v augmented like view v), int64 labels and sample
    indices, the neighbours' indices (with companions) and the (B, V or 2V, 4) int32 crop windows (top, left,
    h, w) the views were cut from."""

    views: list
    labels: Any  # torch.Tensor
    indices: Any  # torch.Tensor
    neighbours: Any = None  # torch.Tensor | None
    windows: Any = None  # torch.Tensor | None


class Samples(NamedTuple):
    """What a backend's `open` tells the base class of its data: how many samples, their (height, width)
    for planning (`sizes(indices)` → (B, 2)), how to name one in a message, the per-sample check made before
    first use (index → why it cannot be used; None: none), and the samples already known to be unusable."""

    count: int
    sizes: Callable[[np.ndarray], np.ndarray]
    describe: Callable[[int], str]
    check: Callable[[np.ndarray], dict[int, str]] | None = None
    failed: dict[int, str] = {}


class Loader(EpochPosition, ABC):
    """Iterable of `Batch`es of the dataset `source` (a path or a `viewpipe.sources.Source`) under `cfg`,
    cropped around the live boxes of `state` (a `SampleState`, optional; with `cfg.companions` it must hold a
    neighbour table). `rank`/`world` default to torch.distributed's. `prefetch`: how many batches after a
    state update the first batch that uses it arrives (the backend's `planned_ahead`, plus one with overlap).
    One iterator at a time: a new one ends the previous one. `state_dict()` / `load_state_dict()` resume
    mid-epoch with the same batches, windows and augmentations; unusable samples are replaced (`Substitutes`).

    A backend implements `open` (its data → `Samples`), `planned_ahead` and `pending` (the epoch's batches
    from `_next` on, each as a function making it from the planner's plan), and `close` if it holds threads."""

    name: ClassVar[str] = ""  # the registry's name for the backend (`register`)
    reads: ClassVar[str | None] = None  # the converted format it needs ("dali" shards, "ffcv"), None: any source
    is_reference: ClassVar[bool] = False  # the papers' own loader, which benchmarks compare against
    preferred_on: ClassVar[tuple[str, ...]] = ()  # the device types it is the default backend on

    def __init__(self, source: Any, cfg: LoaderConfig = LoaderConfig(), state: Any = None, *,
                 rank: int | None = None, world: int | None = None) -> None:
        rank, world = rank_world(rank, world)
        self.cfg, self.state, self.companions = cfg, state, cfg.companions
        self.device = self.choose_device(cfg.device)
        samples = self.open(source)
        check_state(state, samples.count, cfg.companions)
        EpochPosition.__init__(self, samples.count, cfg, rank, world, self.device,
                               resolve_overlap(cfg.overlap, self.device),
                               Substitutes(samples.count, samples.describe, samples.check))
        if samples.failed:
            self.substitutes.add(samples.failed)
        self.planner = Planner(cfg, rank, state, self.substitutes, samples.sizes, cfg.companions)
        self.finisher = ViewFinisher(cfg)
        self.prefetch = self.planned_ahead() + int(self.overlap)

    @staticmethod
    def choose_device(device: Any) -> Any:
        """`cfg.device` as a torch.device ("auto": CUDA when there is one, else the CPU; "cuda": the current CUDA device)."""
        import torch

        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @classmethod
    def can_read(cls, source: Any) -> bool:
        """Whether this backend reads `source` (a path or a Source) as it is, without a conversion."""
        return True

    @abstractmethod
    def open(self, source: Any) -> Samples:
        """Open the data (called once, before anything else is set up; `self.cfg` and `self.device` are set)."""

    @abstractmethod
    def planned_ahead(self) -> int:
        """How many batches the backend plans before the consumer receives them (the live-state bound
        without overlap)."""

    @abstractmethod
    def pending(self) -> Iterator[tuple[int, Callable[[], Any]]]:
        """(b, the function that makes batch b) for the current epoch's batches from `_next` on."""

    def __iter__(self) -> Iterator[Batch]:
        return self.hand_out(self.epoch, len(self.batches()), self.pending())

    def bench_row(self) -> tuple[str, int]:
        """This loader's row in `viewpipe bench`: its name and the views it makes per image."""
        crop = "ContrastiveCrop boxes" if self.cfg.crop.use_box else "RandomResizedCrop"
        return f"{self.name}, {self.cfg.views} views, {crop}", self.cfg.views

    @classmethod
    def baselines(cls) -> tuple[type[Loader], ...]:
        """The benchmark-only loaders `viewpipe bench` times beside this backend (ceilings, stock pipelines)."""
        return ()

    def close(self) -> None:
        """Stop whatever runs between batches (threads, workers); the loader can be iterated again after."""

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- the registry
BACKENDS: dict[str, type[Loader]] = {}
# the modules of the built-in backends, imported (each registering its class) on the first look-up
BUILTIN_MODULES = ("reference", "dali", "ffcv", "memory")
L = TypeVar("L", bound=type[Loader])


def register(name: str) -> Callable[[L], L]:
    """Class decorator of a backend module: `@register("dali")` on `class DaliLoader(Loader)` makes it the
    config's `data.backend: dali`."""

    def add(cls: L) -> L:
        if BACKENDS.setdefault(name, cls) is not cls:
            raise ValueError(f"backend {name!r} registered twice: {BACKENDS[name].__qualname__}, {cls.__qualname__}")
        cls.name = name
        return cls

    return add


def backends() -> dict[str, type[Loader]]:
    """Every registered backend, name → class (the built-in ones imported first)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"viewpipe.pipelines.{module}")
    return dict(sorted(BACKENDS.items()))


def default_backend(device_type: str) -> str:
    """The name of the backend preferred on devices of `device_type` ("cuda", "cpu"): `Loader.preferred_on`."""
    return next(name for name, cls in backends().items() if device_type in cls.preferred_on)


def get_backend(name: str) -> type[Loader]:
    """The loader class of backend `name`."""
    known = backends()
    if name not in known:
        raise ViewpipeError(f"unknown backend {name!r}; available: {', '.join(known)}")
    return known[name]


def make_loader(path: str | os.PathLike[str] | Any, backend: str = "auto", *, batch_size: int = 256,
                views: int | str = 2, size: int = 224, augment: str = "mocov2", scale: tuple[float, float] = (0.2, 1.0),
                alpha: float = 0.6, state: Any = None, device: str = "auto", workers: int | None = None,
                dtype: str = "float32", channels_last: bool = False, shuffle: bool = True, seed: int = 0,
                split: str = "train", rank: int | None = None, world: int | None = None) -> Loader:
    """A loader of `path` yielding `Batch`es of augmented views, with the settings a run usually changes (for
    all of them build a `LoaderConfig` and call `get_backend(name)(path, cfg, state)`).

    Args:
        path: an image folder (<class>/<image>), a .npz JPEG collection, or `viewpipe convert`'s output (which
            the dali and ffcv backends need).
        backend: a registered backend (`backends()`); "auto": the device's default.
        batch_size: samples per batch (per rank); the last incomplete batch is dropped.
        views: views per sample at `size`, or multi-crop groups such as "2x224,6x96@0.05-0.2" (`parse_views`).
        size: the views' side in px.
        augment: the augmentation preset (`viewpipe.augment.PRESETS`).
        scale: RandomResizedCrop's area range.
        alpha: α of ContrastiveCrop's Beta, used when `state` holds boxes.
        state: a `SampleState` whose live boxes (and neighbours) the loader reads; None: RandomResizedCrop.
        device: where views are made: "cpu", "cuda[:i]", "auto" (CUDA if any).
        workers: decode threads or processes (default: up to 8 of the machine's cores).
        dtype: the views' dtype, "float32" or "bfloat16".
        channels_last: the views' memory format.
        shuffle: a new random order each epoch (`loader.set_epoch(e)`).
        seed: the seed of the order, the crops and the augmentation.
        split: the split of a .npz collection.
        rank: this process's rank (default: torch.distributed's, else 0).
        world: the number of ranks (default: torch.distributed's, else 1).

    >>> from viewpipe import make_loader
    >>> loader = make_loader("data/train", "torch", batch_size=8, views=2, size=32, device="cpu", workers=0)
    >>> for batch in loader:
    ...     q, k = batch.views  # each (8, 3, 32, 32), normalised
    >>> tuple(q.shape), tuple(batch.labels.shape)
    ((8, 3, 32, 32), (8,))
    """
    from viewpipe.augment import preset
    from viewpipe.crop import CropConfig
    from viewpipe.pipelines.config import parse_views

    name = default_backend(Loader.choose_device(device).type) if backend == "auto" else backend
    groups = parse_views(views, scale) if isinstance(views, str) else ()
    cfg = LoaderConfig(views=views if isinstance(views, int) else 2, batch_size=batch_size,
                       crop=CropConfig(alpha=alpha, scale=scale, use_box=state is not None),
                       augment=preset(augment, size=size), shuffle=shuffle, seed=seed, dtype=dtype,
                       channels_last=channels_last, groups=groups, device=device, split=split,
                       **({} if workers is None else {"workers": workers}))
    return get_backend(name)(path, cfg, state, rank=rank, world=world)
