"""Loader backends (installed as `viewpipe.pipelines`): each turns a dataset plus the live SampleState
into batches of augmented views. `torch` is the PIL + DataLoader reference every benchmark compares against."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from viewpipe.augment import AugmentConfig, preset
from viewpipe.crop import CropConfig, view_windows
from viewpipe.dist import rank_world as dist_rank_world  # noqa: F401 (the backends' import)
from viewpipe.errors import ViewpipeError


@dataclass(frozen=True)
class ViewGroup:
    """Views of one kind (multi-crop): `count` crops per image resized to `size`, their area drawn from
    `scale`; `use_box`: centred by the ContrastiveCrop boxes (when the loader uses boxes at all). `ratio`,
    `tries` and `augment` (its size is the group's): the group's own, None: the loader's `crop` and `augment`."""

    count: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    use_box: bool = True
    ratio: tuple[float, float] | None = None
    tries: int | None = None
    augment: AugmentConfig | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 1:
            raise ViewpipeError(f"a view group needs count >= 1 and size >= 1, got {self.count} x {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ViewpipeError(f"a view group's scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.ratio is not None and not 0 < self.ratio[0] <= self.ratio[1]:
            raise ViewpipeError(f"a view group's ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.tries is not None and self.tries < 1:
            raise ViewpipeError(f"a view group's tries must be >= 1, got {self.tries}")


def parse_views(spec: str, scale: tuple[float, float] = (0.2, 1.0)) -> tuple[ViewGroup, ...]:
    """View groups from `COUNTxSIZE[@MIN-MAX][:nobox]`, comma-separated, e.g. "2x224,6x96@0.05-0.2": two
    224 px views at the crop scale `scale`, six 96 px views at (0.05, 0.2). A group without a range takes
    `scale` if it is the first, (0.05, 0.2) otherwise (the local crops of SwAV/DINO-style recipes);
    `:nobox` keeps a group off the ContrastiveCrop boxes."""
    groups = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        try:
            part, _, flag = part.partition(":")
            if flag not in ("", "box", "nobox"):
                raise ValueError(flag)
            shape, _, rng = part.partition("@")
            count, size = (int(x) for x in shape.lower().split("x"))
            lo, hi = (float(x) for x in rng.split("-")) if rng else (scale if i == 0 else (0.05, 0.2))
        except ValueError:
            raise ViewpipeError(f"cannot read view group {part!r} of {spec!r}: expected COUNTxSIZE[@MIN-MAX][:nobox], "
                                "e.g. 2x224,6x96@0.05-0.2") from None
        groups.append(ViewGroup(count, size, (lo, hi), flag != "nobox"))
    return tuple(groups)


@dataclass
class LoaderConfig:
    """What every backend is asked for: views per image, batch, crop sampling and augmentation. `groups`
    (multi-crop): the views in groups of their own count, size, scale and box use, in order; without it,
    `views` views of `augment.size` at `crop.scale`. With groups, `views` is their total count."""

    views: int = 2
    batch_size: int = 256
    crop: CropConfig = field(default_factory=CropConfig)
    augment: AugmentConfig = field(default_factory=lambda: preset("mocov2"))
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    augment_impl: str = "auto"  # "fused" (Triton kernels), "torch" (the reference ops), "auto": fused on CUDA
    dtype: str = "float32"  # the views' dtype: "float32" or "bfloat16"
    channels_last: bool = False  # the views' memory format
    groups: tuple[ViewGroup, ...] = ()

    def __post_init__(self) -> None:
        if self.groups:
            self.views = sum(g.count for g in self.groups)

    def view_groups(self) -> tuple[ViewGroup, ...]:
        """The views' groups (one group of `views` views of `augment.size` at `crop.scale` without `groups`)."""
        return self.groups or (ViewGroup(self.views, self.augment.size, self.crop.scale, True),)

    def group_of_views(self) -> list[int]:
        """For each view, the index of its group."""
        return [g for g, group in enumerate(self.view_groups()) for _ in range(group.count)]

    def view_sizes(self) -> list[int]:
        """For each view, its output side."""
        groups = self.view_groups()
        return [groups[g].size for g in self.group_of_views()]

    def group_augment(self, g: int) -> AugmentConfig:
        """The augmentation of group g's views: the group's own or `augment`, at the group's output size."""
        group = self.view_groups()[g]
        return replace(group.augment or self.augment, size=group.size)

    def group_crop(self, g: int) -> CropConfig:
        """The crop sampling of group g's views: `crop` with the group's scale, ratio, tries and box use."""
        group, crop = self.view_groups()[g], self.crop
        return replace(crop, scale=group.scale, ratio=group.ratio or crop.ratio, tries=group.tries or crop.tries,
                       use_box=crop.use_box and group.use_box)


class ViewFinisher:
    """Finishes every view of a batch with the augmenter of its group (`viewpipe.augment.Augmenter`, as `cfg`
    asks: implementation, dtype, memory format), view v drawing view v's parameters from the batch's
    generator; views V + v (companions) like view v."""

    def __init__(self, cfg: LoaderConfig) -> None:
        import torch

        from viewpipe.augment import Augmenter

        if cfg.dtype not in ("float32", "bfloat16"):
            raise ViewpipeError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
        self.cfg, self.group = cfg, cfg.group_of_views()
        self.augmenters = [Augmenter(cfg.group_augment(g), channels_last=cfg.channels_last, impl=cfg.augment_impl,
                                     out_dtype=getattr(torch, cfg.dtype)) for g in range(len(cfg.view_groups()))]

    def finish(self, x: Any, v: int, generator: Any, layout: str = "chw") -> Any:
        """View v (of 2V with companions) finished: `Augmenter.finish` of its group."""
        V = self.cfg.views
        return self.augmenters[self.group[v % V]].finish(x, v % V, generator, layout=layout)

    def crop_and_finish(self, images: Any, windows: Any, generator: Any, layout: str = "auto") -> list:
        """V views cut from `images` at `windows` (B, V, 4) and finished, group by group (`Augmenter.forward`)."""
        import torch

        out, start = [], 0
        for group, aug in zip(self.cfg.view_groups(), self.augmenters):
            win = torch.as_tensor(windows)[:, start : start + group.count]
            views = aug(images, win, generator, layout=layout, first_view=start)
            out += views
            start += group.count
        return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                drop_last: bool = True) -> np.ndarray:
    """The sample indices rank `rank` of `world` visits in `epoch`: the permutation
    `default_rng([seed, epoch]).permutation(n)` (or 0..n-1 without shuffle), strided by rank. With
    `drop_last` every rank gets n // world samples (the remainder is left out); without it every sample is
    visited by exactly one rank and ranks may differ by one sample."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if drop_last:
        order = order[: (n // world) * world]
    return order[rank::world].astype(np.int64)


def epoch_batches(n: int, cfg: LoaderConfig, epoch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """Rank `rank`'s batches of `epoch` (see `epoch_order`), the same number on every rank so that
    collective calls in a DDP step never wait for a rank that has finished. With `drop_last` only full
    batches; without it every sample once, the last batch smaller, and where a rank holds one sample fewer
    than the others and that empties its last batch, its last full batch is split in two (B-1, 1)."""
    order, B = epoch_order(n, cfg.seed, epoch, cfg.shuffle, rank, world, cfg.drop_last), cfg.batch_size
    if cfg.drop_last:
        return [order[b * B : (b + 1) * B] for b in range(len(order) // B)]
    count = -(-(-(-n // world)) // B)  # batches of the largest rank: ceil(ceil(n / world) / B)
    if count * B - len(order) >= B:  # this rank's samples fill one batch fewer
        if B == 1 or not len(order):
            raise ViewpipeError(f"{n} samples over {world} ranks in batches of {B}: ranks cannot get equal batch "
                                "counts without repeating samples; use drop_last or a larger batch")
        cuts = list(range(B, len(order) - B + 1, B)) + [len(order) - 1]
        return np.split(order, cuts)
    return [order[b * B : (b + 1) * B] for b in range(count)]


class Substitutes:
    """The samples a run cannot use — they fail to decode, or their bytes differ from the checksum written at
    conversion — each replaced by the next usable sample (cyclically) for the rest of the run, announced once
    on stderr and kept in the loader's state dict. One mechanism for every backend; `check(indices)`, where a
    source has one, names the damaged samples among `indices` (index → why)."""

    def __init__(self, n: int, describe: Callable[[int], str],
                 check: Callable[[np.ndarray], dict[int, str]] | None = None) -> None:
        self.n, self.describe, self.check = n, describe, check
        self.bad: dict[int, str] = {}  # sample index -> why it cannot be used

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """Each index that cannot be used replaced by the next sample (cyclically) that can."""
        if not self.bad:
            return indices
        out = np.array(indices, dtype=np.int64, copy=True)
        for j, k in enumerate(out.tolist()):
            while k in self.bad:
                k = (k + 1) % self.n
            out[j] = k
        return out

    def usable(self, indices: np.ndarray) -> np.ndarray:
        """`indices` substituted, after checking the bytes of the samples not checked before (where the source
        can): a damaged one is added and replaced too."""
        while True:
            out = self(indices)
            failed = self.check(out) if self.check is not None else {}
            if not failed:
                return out
            self.add(failed)

    def add(self, failed: dict[int, str]) -> None:
        """Replace `failed` (index → why) from now on, or raise when no usable sample would be left."""
        if len(set(self.bad) | set(failed)) >= self.n:
            raise ViewpipeError("no sample of the dataset can be used (none decodes, or every one is damaged); "
                                "check the data (viewpipe convert --verify)")
        self.bad.update(failed)
        for k, why in failed.items():
            print(f"viewpipe: {self.describe(k)} {why}; replaced by sample {int(self(np.array([k]))[0])} from now on "
                  f"({len(self.bad)} replaced so far); re-convert it to restore it", file=sys.stderr)

    def state_dict(self) -> dict[int, str]:
        return dict(self.bad)

    def load_state_dict(self, bad: dict) -> None:
        self.bad = {int(k): str(v) for k, v in bad.items()}


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


class BatchPlan(NamedTuple):
    """One batch decided before any byte is read (`Planner.plan`): the samples, their companions, every
    view's crop window and the seed of the photometric draws."""

    indices: np.ndarray  # (B,) int64, samples that cannot be used already replaced
    neighbours: np.ndarray | None  # (B,) int64: one companion per sample, or None
    windows: np.ndarray  # (B, V or 2V, 4) int32 (top, left, h, w): the samples' V views, then the neighbours'
    seed: int  # of the torch Generator the batch's photometric parameters are drawn from


class Planner:
    """The plan of every batch, the same function for every backend, so that for a (seed, epoch, rank, batch)
    and a SampleState all backends cut the same windows from the same samples. Draw order on
    `default_rng([seed, epoch, rank, batch])`: the samples' V windows (view-major), then with companions each
    sample's neighbour column (uniform over the k of its row in the state's neighbour table) and the
    neighbours' V windows; boxes are read from the live SampleState when the plan is made. The photometric
    seed is word `batch` of `SeedSequence([seed, epoch, rank])`. `sizes(indices)` gives the images' (height,
    width) after EXIF orientation."""

    def __init__(self, cfg: LoaderConfig, rank: int, state: Any, substitutes: Substitutes,
                 sizes: Callable[[np.ndarray], np.ndarray], companions: bool = False) -> None:
        self.cfg, self.rank, self.state, self.substitutes = cfg, rank, state, substitutes
        self.sizes, self.companions = sizes, companions
        self._seeds: tuple[int, np.ndarray] = (-1, np.zeros(0, np.uint64))  # (epoch, its words so far)

    def seed(self, epoch: int, b: int) -> int:
        """The torch seed of batch b's photometric draws: word b of one SeedSequence per epoch and rank (its
        words are a prefix-stable stream, generated once per epoch and extended by doubling)."""
        cached, words = self._seeds
        if cached != epoch or b >= len(words):
            words = np.random.SeedSequence([self.cfg.seed, epoch, self.rank]).generate_state(
                max(b + 1, 2 * len(words) if cached == epoch else 256), np.uint64)
            self._seeds = (epoch, words)
        return int(words[b]) & 0x7FFF_FFFF_FFFF_FFFF

    def plan(self, epoch: int, b: int, indices: np.ndarray) -> BatchPlan:
        """Batch b of `epoch` over `indices` (the epoch order's batch b)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch, self.rank, b])
        indices = self.substitutes.usable(np.asarray(indices, dtype=np.int64))
        windows = self._windows(rng, indices)
        neighbours = None
        if self.companions:
            table = self.state.neighbours(indices)
            chosen = table[np.arange(len(indices)), rng.integers(0, table.shape[1], size=len(indices))]
            neighbours = self.substitutes.usable(chosen.astype(np.int64))
            windows = np.concatenate([windows, self._windows(rng, neighbours)], 1)
        return BatchPlan(indices, neighbours, np.ascontiguousarray(windows, dtype=np.int32), self.seed(epoch, b))

    def _windows(self, rng: np.random.Generator, indices: np.ndarray) -> np.ndarray:
        """(B, V, 4): each group's windows in turn (its count, scale and box use), one draw per group."""
        crop, sizes = self.cfg.crop, self.sizes(indices)
        boxes = self.state.boxes(indices) if self.state is not None and crop.use_box else None
        return np.concatenate([view_windows(rng, sizes, boxes if g.use_box else None, g.count, self.cfg.group_crop(i))
                               for i, g in enumerate(self.cfg.view_groups())], 1)


def sample_check(source: Any, sizes: Any) -> Callable[[np.ndarray], dict[int, str]]:
    """What a backend checks once per sample before using it: that its header gives its size (`sizes`, a
    `viewpipe.sources.ImageSizes`), and its bytes against the conversion's checksums where the source keeps
    them (`source.damaged`). Returns the samples that cannot be used, index → why."""
    damaged = getattr(source, "damaged", None)

    def check(indices: np.ndarray) -> dict[int, str]:
        failed = sizes.check(indices)
        if damaged is not None:
            failed.update(damaged(np.array([k for k in np.asarray(indices).tolist() if k not in failed],
                                           dtype=np.int64)))
        return failed

    return check


def check_state(state: Any, n: int, companions: bool) -> None:
    """A backend's SampleState must have one row per sample (and a neighbour table for companions)."""
    if state is not None and len(state) != n:
        raise ViewpipeError(f"sample state {state.name!r} has {len(state)} rows but the data has {n} samples")
    if companions and (state is None or not state.has("neighbours")):
        raise ViewpipeError("companion samples need a SampleState with a neighbour table: "
                            "SampleState.create(n, neighbours=k)")


def batch_tensors(batch: Any) -> Iterator[Any]:
    """Every tensor of a batch (tuples and lists nested), for stream bookkeeping."""
    if isinstance(batch, (tuple, list)):
        for item in batch:
            yield from batch_tensors(item)
    elif hasattr(batch, "record_stream"):
        yield batch


class EpochPosition:
    """Where a backend's loader is in its epochs, and how it hands batches out, shared by every backend:
    `set_epoch`, `state_dict` / `load_state_dict` (epoch and next batch: mid-epoch resume), `order`, `batches`,
    `len`, and `hand_out`. A subclass sets `num_samples`, `cfg`, `rank`, `world`, `device` and `overlap`, and
    calls `EpochPosition.__init__`; its iteration starts at batch `_next` of `epoch`.

    Overlap: a backend describes each batch as a function doing the batch's device work (copy, crops,
    augmentation) and `hand_out` runs batch b + 1's function while the consumer holds batch b. On CUDA it
    runs on a side stream, so that the augmentation overlaps the training step on the consumer's stream (the
    consumer's stream waits for the batch's event, and its tensors are recorded on the consumer's stream so
    that their memory is not reused early); on the CPU the same one-batch look-ahead runs without streams
    (the tests' twin of the CUDA path). It adds one batch to how late a SampleState update can arrive."""

    num_samples: int
    cfg: LoaderConfig
    rank: int
    world: int
    device: Any  # torch.device
    overlap: bool = False
    substitutes: Substitutes

    def __init__(self) -> None:
        self.epoch = 0
        self._next = 0  # the batch of `epoch` the next iteration starts at (set by load_state_dict)
        self._generation = 0  # the current iteration: an older one stops handing out batches

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its first batch on the next iteration (the order depends on (seed, epoch))."""
        self.epoch, self._next = int(epoch), 0

    def state_dict(self) -> dict:
        """Where the loader is: the epoch and the next batch (a finished epoch is the next one at batch 0), and
        the samples replaced so far (`decode_failures`)."""
        return {"epoch": self.epoch, "batch": self._next, "decode_failures": self.substitutes.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict()`: the next iteration yields the remaining batches of that epoch."""
        self.epoch, self._next = int(sd["epoch"]), int(sd["batch"])
        self.substitutes.load_state_dict(sd.get("decode_failures", {}))

    @property
    def decode_failures(self) -> dict[int, str]:
        """The samples replaced so far because they cannot be used (index → why)."""
        return self.substitutes.state_dict()

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's sample order in `epoch` (default: the current one)."""
        return epoch_order(self.num_samples, self.cfg.seed, self.epoch if epoch is None else epoch,
                           self.cfg.shuffle, self.rank, self.world, self.cfg.drop_last)

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of sample indices in `epoch` (see `epoch_batches`)."""
        return epoch_batches(self.num_samples, self.cfg, self.epoch if epoch is None else epoch, self.rank,
                             self.world)

    def __len__(self) -> int:
        return len(self.batches())

    def hand_out(self, epoch: int, count: int, pending: Iterable[tuple[int, Callable[[], Any]]]) -> Iterator[Any]:
        """Yield the batches of `pending` — (batch number, function making the batch) pairs of `epoch`, which
        has `count` batches — keeping the position: after batch b is handed out the next iteration starts at
        b + 1, after the last one at the next epoch. With `overlap`, one batch ahead (see the class)."""
        import torch

        self._generation += 1
        generation = self._generation
        cuda = self.overlap and torch.device(self.device).type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        ready, items = None, iter(pending)
        while self._generation == generation:  # (a newer iteration takes over the backend: this one stops)
            try:
                b, work = next(items)
            except StopIteration:
                break
            with torch.cuda.stream(side) if side is not None else nullcontext():
                batch = work()
            made = (b, batch, side.record_event() if side is not None else None)
            if not self.overlap:
                ready, made = made, None
            if ready is not None:
                if self._generation != generation:
                    return
                yield self._hand_over(epoch, count, *ready)
            ready = made
        if ready is not None and self._generation == generation:
            yield self._hand_over(epoch, count, *ready)
        if self._generation == generation and self.epoch == epoch and self._next >= count:
            self.epoch, self._next = epoch + 1, 0  # (an epoch resumed at its end has nothing left)

    def _hand_over(self, epoch: int, count: int, b: int, batch: Any, event: Any) -> Any:
        if event is not None:
            import torch

            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in batch_tensors(batch):
                if t.is_cuda:
                    t.record_stream(stream)
        self.epoch, self._next = (epoch + 1, 0) if b + 1 >= count else (epoch, b + 1)
        return batch


def resolve_overlap(overlap: bool | None, device: Any) -> bool:
    """`overlap=None` (auto): on for CUDA devices, where it hides the augmentation behind the training step."""
    import torch

    return torch.device(device).type == "cuda" if overlap is None else bool(overlap)


# name -> "module:function" building a loader as f(source, cfg, state, ...); imported on first use.
BACKENDS: dict[str, str] = {
    "torch": "viewpipe.pipelines.reference:reference_loader",
    "dali": "viewpipe.pipelines.dali:dali_loader",
    "ffcv": "viewpipe.pipelines.ffcv:ffcv_loader",
    "memory": "viewpipe.pipelines.memory:memory_loader",
}


def get_backend(name: str) -> Callable[..., Any]:
    """The loader factory of backend `name`."""
    if name not in BACKENDS:
        raise ViewpipeError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    module, func = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), func)
