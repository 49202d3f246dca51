"""The batch plan every backend follows: each rank's epoch order and batches (a pure function of seed, epoch,
rank and world), the samples a run cannot use and their substitutes, and `Planner`, which decides each
batch's samples, companions, crop windows and photometric seed before any byte is read."""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple

import numpy as np

from viewpipe.crop import heatmap_windows, view_windows
from viewpipe.errors import ViewpipeError
from viewpipe.heatmap_boxes import LiveBoxes
from viewpipe.pipelines.config import LoaderConfig


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
    neighbours' V windows; boxes are read from the live SampleState when the plan is made: derived from its
    heatmaps at its threshold once heatmaps are published (`LiveBoxes`), its boxes table before. A group with
    `centres="heatmap"` draws its centres from the live heatmaps instead (`heatmap_windows`). The photometric
    seed is word `batch` of `SeedSequence([seed, epoch, rank])`. `sizes(indices)` gives the images' (height,
    width) after EXIF orientation."""

    def __init__(self, cfg: LoaderConfig, rank: int, state: Any, substitutes: Substitutes,
                 sizes: Callable[[np.ndarray], np.ndarray], companions: bool = False) -> None:
        self.cfg, self.rank, self.state, self.substitutes = cfg, rank, state, substitutes
        self.sizes, self.companions = sizes, companions
        self.live = LiveBoxes(state) if state is not None else None
        self._guided = any(g.centres == "heatmap" and g.use_box for g in cfg.view_groups())
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
        use = self.state is not None and crop.use_box
        boxes = self.live.boxes(indices) if use else None
        heat = self.state.heatmaps(indices) if use and self._guided and self.live.derived() else None
        return np.concatenate([clean_windows(sizes, g.count) if g.clean else
                               self._group_windows(rng, i, sizes, boxes, heat)
                               for i, g in enumerate(self.cfg.view_groups())], 1)

    def _group_windows(self, rng: np.random.Generator, i: int, sizes: np.ndarray, boxes: np.ndarray | None,
                       heat: np.ndarray | None) -> np.ndarray:
        """Group i's (B, count, 4) windows: by the heatmaps' mass (`heat` given and the group asks for it), in
        the boxes (the group uses boxes), or plain RandomResizedCrop."""
        g = self.cfg.view_groups()[i]
        if heat is not None and g.use_box and g.centres == "heatmap":
            return heatmap_windows(rng, sizes, heat, g.count, self.cfg.group_crop(i))
        return view_windows(rng, sizes, boxes if g.use_box else None, g.count, self.cfg.group_crop(i))


def clean_windows(sizes: np.ndarray, views: int = 1) -> np.ndarray:
    """(B, views, 4) int32 windows of a clean view (no random draw): the whole image, which the view is made
    from (resized to its size, or with its group's `resize` by torchvision's Resize + CenterCrop)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    win = np.concatenate([np.zeros_like(sizes), sizes], 1).astype(np.int32)
    return np.repeat(win[:, None], views, axis=1)


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
