"""The loader contract, one test per clause, run for every backend ("torch": the PIL + DataLoader reference,
"dali": DALI's CPU mode, "ffcv": FFCV on the CPU) over the same converted dataset: batches, shapes and
dtypes; windows drawn by the shared sampler from the live boxes and views that are those windows' pixels;
a box or neighbour update reaching the running loader within `loader.prefetch` batches; companions that are
the neighbour's pixels; ranks (and torch.distributed processes) partitioning each epoch; the order a
function of (seed, epoch); reproducible views; mid-epoch resume; the same plan as the reference; state errors
reaching the consumer.

What only one backend has (DALI's ROI axis order, FFCV's decoder, raw samples and fused crops, the
reference's source paths and worker processes, each one's way of meeting damaged data, their errors) is
tested in its own module."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import ffcv  # noqa: F401  (`make test` installs both: a missing backend fails, never skips)
import nvidia.dali  # noqa: F401

from conftest import (build, FfcvDecoded, check_batches, core_crop, documented_windows, loader_cfg, plain_augment,
                      random_boxes, same_batches)
from viewpipe.augment import preset
from viewpipe.crop import CropConfig, view_windows
from viewpipe.errors import ViewpipeError
from viewpipe.formats import DatasetIndex, open_image
from viewpipe.pipelines import Batch, Loader, LoaderConfig, backends, epoch_batches, epoch_order, get_backend
from viewpipe.sources import ShardSource
from viewpipe.state import SampleState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKENDS = ["torch", "dali", "ffcv", "memory"]
# what each backend needs to run on the CPU (the reference runs on the CPU by default)
ON_CPU: dict[str, dict] = {"torch": {}, "dali": {"device": "cpu"}, "ffcv": {"device": "cpu"}, "memory": {"device": "cpu"}}
# cfg.workers: DataLoader processes for the reference (none: the tests stay in one process unless they ask),
# decoding threads for DALI and FFCV
WORKERS = {"torch": 0, "dali": 2, "ffcv": 2, "memory": 2}
S, N = 32, 96
PLAIN = plain_augment(S)
FULL = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make(converted: Path) -> Any:
    """`make(backend, cfg, state=None, **kw)`: a loader of `backend` over the converted dataset, on the CPU;
    every loader made is closed after the test."""
    made: list = []

    def make(backend: str, cfg: LoaderConfig, state: SampleState | None = None, data: Any = None, **kw):  # noqa: ANN202
        loader = build(get_backend(backend), converted if data is None else data, cfg, state, **ON_CPU[backend], **kw)
        assert isinstance(loader, Loader)
        made.append(loader)
        return loader

    yield make
    for loader in made:
        loader.close()


@pytest.fixture(scope="module")
def index(converted: Path) -> DatasetIndex:
    return DatasetIndex.load(converted)


def cfg_(backend: str, **kw) -> LoaderConfig:
    return loader_cfg(**({"workers": WORKERS[backend]} | kw))


def sizes_of(index: DatasetIndex, indices: np.ndarray) -> np.ndarray:
    return np.stack([index.heights[indices], index.widths[indices]], 1)


def batch_rng(cfg: LoaderConfig, epoch: int, b: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, epoch, rank, b])


def box_range(sizes: np.ndarray, boxes: np.ndarray, h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """The corner range ContrastiveCrop allows for (h, w) crops (B, V) of images `sizes` with `boxes`: the box
    edges minus half the crop, clamped into the image."""
    H, W = sizes[:, :1], sizes[:, 1:]
    b = boxes.astype(np.float64)
    clamp = lambda x, hi: np.clip(x, 0, hi)  # noqa: E731
    return (clamp((H * b[:, :1]).astype(int) - h // 2, H - h), clamp((H * b[:, 2:3]).astype(int) - h // 2, H - h),
            clamp((W * b[:, 1:2]).astype(int) - w // 2, W - w), clamp((W * b[:, 3:4]).astype(int) - w // 2, W - w))


def sequence(loader: Any, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [i for _, _, idx, *_ in loader for i in idx.tolist()]


def pil_crop(img, window: list[int]) -> np.ndarray:  # noqa: ANN001  (a PIL image)
    """PIL's crop-and-resize (bilinear) of `window` (top, left, h, w) to S×S: float HWC grey levels."""
    top, left, h, w = window
    return np.asarray(img.resize((S, S), 2, box=(left, top, left + w, top + h)), dtype=np.float32)


def pixels(view: torch.Tensor) -> np.ndarray:
    """A PLAIN view (3, S, S) in [0, 1] as HWC grey levels."""
    return view.permute(1, 2, 0).numpy() * 255.0


class ViewPixels:
    """What a PLAIN view of sample k's window is, made outside the loader with each backend's resize:

    - torch: PIL's bilinear crop-resize of PIL's decode, exactly (within 1e-3);
    - dali: the same within DALI's resize difference. Measured (DALI 2.4 CPU, generated JPEGs 40-96 px,
      S=32): the decodes are identical; DALI's linear + antialias resize and PIL's bilinear with a box differ
      by 0.16 grey levels on average, 99.9th percentile 1, max 10: bounds 0.5, 2 and 16, per view 2.5;
    - ffcv: the core crop-resize of libffcv's decode of the same bytes, exactly (so the padded decode slots
      and their repeated edge change nothing), and within 1.5 grey levels per view of the same crop of PIL's
      decode (libjpeg-turbo's fast DCT against PIL's accurate one: about 1 on average, max 5).
    - memory: the core crop-resize of PIL's decode, exactly (it decodes with PIL and crops with roi_align).

    For every backend the same window cut from another image differs by more than 7.5 per view: the checks
    can tell images apart."""

    OTHER = 7.5

    def __init__(self, backend: str, data: Path) -> None:
        self.backend = backend
        self.ffcv = FfcvDecoded(data) if backend == "ffcv" else None
        self.source = ShardSource(data)
        self._images: dict[int, Any] = {}
        self._pil: dict[int, torch.Tensor] = {}
        self.diffs: list[np.ndarray] = []  # |view - expected| per view
        self.near: list[float] = []  # ffcv: per-view mean against PIL's decode
        self.other: list[float] = []

    def image(self, k: int) -> Any:
        if k not in self._images:
            if self.ffcv is not None:
                self._images[k] = self.ffcv(k)
            elif self.backend == "memory":
                self._images[k] = torch.from_numpy(np.array(open_image(self.source.read(k))))
            else:
                self._images[k] = open_image(self.source.read(k))
        return self._images[k]

    def crop(self, k: int, window: list[int]) -> np.ndarray:
        img = self.image(k)
        return core_crop(img, window, S).numpy() if isinstance(img, torch.Tensor) else pil_crop(img, window)

    def shape(self, k: int) -> tuple[int, int]:
        img = self.image(k)
        return tuple(img.shape[:2]) if isinstance(img, torch.Tensor) else (img.height, img.width)

    def add(self, view: torch.Tensor, k: int, window: list[int], other: int) -> None:
        """Compare one view (3, S, S) with sample k's `window`, and with the same window of sample `other`."""
        got = pixels(view)
        self.diffs.append(np.abs(got - self.crop(k, window)))
        if self.ffcv is not None:
            if k not in self._pil:
                self._pil[k] = self.ffcv.pil(k)
            self.near.append(float(np.abs(got - core_crop(self._pil[k], window, S).numpy()).mean()))
        H, W = self.shape(other)
        if window[0] + window[2] <= H and window[1] + window[3] <= W:
            self.other.append(float(np.abs(got - self.crop(other, window)).mean()))

    def verify(self) -> None:
        d = np.stack(self.diffs)
        near = f"; against PIL's decode: mean {np.mean(self.near):.2f}, max {max(self.near):.2f}" if self.near else ""
        print(f"{self.backend}: {len(d)} views against their windows' pixels: max {d.max():.3f}, mean "
              f"{d.mean():.3f}, per-view mean max {d.mean(axis=(1, 2, 3)).max():.3f} grey levels; the same windows "
              f"of other images: min {min(self.other):.1f}{near}")
        if self.backend == "dali":
            assert d.mean() <= 0.5 and np.percentile(d, 99.9) <= 2.0 and d.max() <= 16.0
            assert d.mean(axis=(1, 2, 3)).max() < 2.5
        else:
            assert d.max() <= 1e-3
        if self.near:
            assert max(self.near) <= 1.5
        assert self.other and min(self.other) > self.OTHER


def test_registered(backend: str) -> None:
    """Each backend is its module's `Loader` subclass, registered under its name."""
    import importlib

    module, name = {"torch": ("reference", "ReferenceLoader"), "dali": ("dali", "DaliLoader"),
                    "ffcv": ("ffcv", "FfcvLoader"), "memory": ("memory", "MemoryLoader")}[backend]
    cls = get_backend(backend)
    assert cls is getattr(importlib.import_module(f"viewpipe.pipelines.{module}"), name)
    assert issubclass(cls, Loader) and cls.name == backend and sorted(backends()) == sorted(BACKENDS)


def test_every_loader_builds_from_the_same_arguments(converted: Path, state_name: str) -> None:
    """Every registered backend and every benchmark-only loader it names is built as `Cls(source, cfg, state,
    rank=, world=)` from the same arguments, is a `Loader` (context manager, length, position) and yields
    `Batch`es of the epoch's samples."""
    cfg = cfg_("torch", device="cpu", workers=1, batch_size=16)
    with SampleState.create(N, name=state_name) as st:
        built = []
        for cls in backends().values():
            for kind in (cls, *cls.baselines()):
                with kind(ShardSource(converted), cfg, st, rank=0, world=1) as loader:
                    assert isinstance(loader, Loader) and len(loader) == N // 16
                    batch = next(iter(loader))
                    assert isinstance(batch, Batch) and len(batch.indices) == 16
                    assert set(batch.indices.tolist()) <= set(range(N)) and loader.state_dict()["batch"] == 1
                built.append(kind.__name__)
    assert len(built) == len(BACKENDS) + 6  # (DALI's decode, cut, stock and expert loaders; FFCV's decode and stock)


def test_shapes_dtypes_labels_and_length(backend: str, make: Callable, index: DatasetIndex) -> None:
    """V float32 views (B, 3, S, S), int64 labels (the dataset's) and indices, (B, V, 4) int32 windows, no
    neighbours; the epoch's batches (`epoch_batches`): only full ones with drop_last, else every sample once
    and the last batch smaller; two views of an image differ (independent crops and augmentations)."""
    for drop_last, n_batches, last, augment in ((True, N // 10, 10, preset("byol", size=24)), (False, 10, 6, PLAIN)):
        loader = make(backend, cfg_(backend, views=3, batch_size=10, drop_last=drop_last, augment=augment))
        assert len(loader) == n_batches
        batches = list(loader)
        assert len(batches) == n_batches and all(isinstance(b, Batch) for b in batches)
        seen = check_batches(batches, index.labels, 3, augment.size)
        assert [b.indices.tolist() for b in batches] == [x.tolist() for x in epoch_batches(N, loader.cfg, 0)]
        assert len(batches[-1].indices) == last
        assert len(set(seen)) == len(seen)
        if not drop_last:
            assert sorted(seen) == list(range(N))
        for b in batches:
            assert b.neighbours is None
            assert b.windows.shape == (len(b.indices), 3, 4) and b.windows.dtype == torch.int32
        assert not torch.equal(batches[0].views[0], batches[0].views[1])


def test_windows_follow_the_sampler_and_views_are_their_pixels(backend: str, make: Callable, index: DatasetIndex,
                                                               converted: Path, state_name: str) -> None:
    """Every window is the NumPy sampler's for the documented draws (`default_rng([seed, epoch, rank,
    batch])`, V·B windows view-major) with the image sizes and the live boxes; inside its image, its corner in
    the box's range; and each view is that window's pixels (see `ViewPixels`)."""
    cfg = cfg_(backend, augment=PLAIN, crop=CropConfig(alpha=0.6))
    check, nonsquare = ViewPixels(backend, converted), 0
    with SampleState.create(N, name=state_name) as st:
        st.set_boxes(random_boxes(N))
        loader = make(backend, cfg, st)
        loader.set_epoch(1)
        for b, (views, _, indices, _, windows) in enumerate(loader):
            idx = indices.numpy()
            assert windows.dtype == torch.int32
            sizes, boxes = sizes_of(index, idx), st.boxes(idx)
            np.testing.assert_array_equal(windows.numpy(), documented_windows(sizes, boxes, cfg, batch_rng(cfg, 1, b)))
            top, left, h, w = (windows.numpy()[..., i] for i in range(4))
            assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
            assert (top + h <= sizes[:, :1]).all() and (left + w <= sizes[:, 1:]).all()
            top_lo, top_hi, left_lo, left_hi = box_range(sizes, boxes, h, w)
            assert ((top_lo <= top) & (top <= top_hi) & (left_lo <= left) & (left <= left_hi)).all()
            nonsquare += int((h != w).sum())
            for n, k in enumerate(idx.tolist()):
                for v in range(cfg.views):
                    check.add(views[v][n], k, windows[n, v].tolist(), int(idx[n - 1]))
    assert b == len(loader) - 1 and nonsquare > len(check.diffs) // 2
    check.verify()


# (backend, loader arguments, cfg.workers, the live-state bound `loader.prefetch` they give)
LIVE = [
    ("torch", {"prefetch_factor": 2}, 0, 1),  # workers × prefetch_factor + 1 (+ 1 with overlap)
    ("torch", {"prefetch_factor": 1}, 1, 2),
    ("torch", {"prefetch_factor": 2}, 2, 5),
    ("dali", {"prefetch_queue_depth": 1, "overlap": False}, 2, 1),  # DALI's queue depth (+ 1 with overlap)
    ("dali", {"prefetch_queue_depth": 2, "overlap": False}, 2, 2),
    ("dali", {"prefetch_queue_depth": 3, "overlap": False}, 2, 3),
    ("dali", {"prefetch_queue_depth": 2, "overlap": True}, 2, 3),
    ("dali", {"prefetch_queue_depth": 2, "plan_ahead": 2, "overlap": False}, 2, 4),  # + plan_ahead (its thread)
    ("ffcv", {"batches_ahead": 1}, 2, 3),  # batches_ahead + 2 (+ 1 with overlap)
    ("ffcv", {"batches_ahead": 3}, 2, 5),
    ("memory", {"overlap": False}, 2, 1),  # planned when the consumer asks (+ 1 with overlap)
    ("memory", {"overlap": True}, 2, 2),
]


@pytest.mark.parametrize("backend,kw,workers,bound", LIVE,
                         ids=[f"{b}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + f"-workers{w}"
                              for b, kw, w, _ in LIVE])
def test_box_and_neighbour_update_reaches_the_running_loader(backend: str, kw: dict, workers: int, bound: int,
                                                             make: Callable, index: DatasetIndex,
                                                             state_name: str) -> None:
    """Boxes and neighbours published after the consumer received batch u are used by every batch from
    u + `loader.prefetch` on (each batch wholly old or new: windows and companions from one plan). Waiting
    before the update lets the loader fill its queue (workers, FFCV's thread): then exactly the batches before
    the bound are old, so the bound is also attained."""
    cfg = cfg_(backend, workers=workers, augment=PLAIN, batch_size=4, crop=CropConfig(alpha=0.6))
    new_box = np.array([0.0, 0.0, 0.25, 0.3], dtype=np.float32)
    with SampleState.create(N, name=state_name, neighbours=2) as st:
        st.set_neighbours(np.stack([(np.arange(N) + 1) % N] * 2, 1).astype(np.int32))
        loader = make(backend, cfg, st, companions=True, **kw)
        assert loader.prefetch == bound
        update_after, late, changed = 3, [], 0
        for b, (_, _, idx, nb, win) in enumerate(loader):
            i = idx.numpy()
            expect = {}
            for name, box, shift in (("old", FULL, 1), ("new", new_box, 0)):
                rng = batch_rng(cfg, 0, b)
                own = documented_windows(sizes_of(index, i), np.tile(box, (len(i), 1)), cfg, rng)
                rng.integers(0, 2, size=len(i))
                n = (i + shift) % N
                expect[name] = (np.concatenate([own, documented_windows(sizes_of(index, n), np.tile(box, (len(i), 1)),
                                                                        cfg, rng)], 1), n)
            got = "old" if np.array_equal(win.numpy(), expect["old"][0]) else "new"
            np.testing.assert_array_equal(win.numpy(), expect[got][0])  # wholly one or the other
            np.testing.assert_array_equal(nb.numpy(), expect[got][1])  # and its neighbours the same
            if b <= update_after:
                assert got == "old"
            elif b < update_after + loader.prefetch:
                late.append(got)
            else:
                assert got == "new", (b, loader.prefetch)  # the documented bound
                changed += not np.array_equal(expect["new"][0], expect["old"][0])
                top, left, h, w = (win.numpy()[..., j] for j in range(4))  # (the neighbours are the samples now)
                top_lo, top_hi, left_lo, left_hi = box_range(sizes_of(index, i), np.tile(new_box, (len(i), 1)), h, w)
                assert (top >= 0).all() and (top <= top_hi).all() and (left >= 0).all() and (left <= left_hi).all()
            if b == update_after:
                # (DALI calls its source in the consumer's thread, or with plan_ahead its thread fills a queue; FFCV's
                # thread and the workers fill their queues)
                time.sleep({"torch": 1.0 if workers else 0, "dali": 0.5 if kw.get("plan_ahead") else 0, "ffcv": 0.5,
                            "memory": 0}[backend])
                st.set_boxes(np.tile(new_box, (N, 1)))
                st.set_neighbours(np.stack([np.arange(N)] * 2, 1).astype(np.int32))
        assert b == len(loader) - 1 >= update_after + loader.prefetch and changed > 0
        print(f"{backend} {kw} workers {workers}: batches after the update still old: {late.count('old')}, "
              f"bound {loader.prefetch}")
        assert late == ["old"] * (loader.prefetch - 1)
        # the next epoch too, from the same loader (persistent workers, a restarted pipeline)
        assert all(torch.equal(nb, idx) for _, _, idx, nb, _ in loader)


def test_companions_are_the_neighbours_pixels(backend: str, make: Callable, index: DatasetIndex, converted: Path,
                                              state_name: str) -> None:
    """With companions, views[V:] are crops of one of the sample's k neighbours, chosen uniformly, at the
    windows the sampler draws after the sample's own; the sample's own views, windows and augmentations are
    those without companions; the neighbours are int64. A neighbour update reaches the running loader within
    the bound; without a neighbour table companions are an error."""
    k = 3
    table = np.stack([(np.arange(N) + 7 * (j + 1)) % N for j in range(k)], 1).astype(np.int32)
    cfg = cfg_(backend, crop=CropConfig(alpha=0.6))  # mocov2 views: the augmentation draws are compared too
    V = cfg.views
    with SampleState.create(N, name=state_name, neighbours=k) as st:
        st.set_boxes(random_boxes(N, 1))
        st.set_neighbours(table)
        plain = list(make(backend, cfg, st))
        loader = make(backend, cfg, st, companions=True)
        columns = []
        for b, ((views, _, idx, nb, win), (pviews, _, pidx, _, pwin)) in enumerate(zip(loader, plain)):
            assert len(views) == 2 * V and win.shape == (len(idx), 2 * V, 4) and nb.dtype == torch.int64
            assert torch.equal(idx, pidx) and torch.equal(win[:, :V], pwin)
            assert all(torch.equal(a, p) for a, p in zip(views[:V], pviews))
            i, n = idx.numpy(), nb.numpy()
            col = [table[a].tolist().index(m) for a, m in zip(i, n)]  # raises if n is not a neighbour of i
            columns += col
            # the companion windows are the sampler's for the neighbours, drawn after the samples' own
            r = batch_rng(cfg, 0, b)
            view_windows(r, sizes_of(index, i), st.boxes(i), V, cfg.crop)
            assert r.integers(0, k, size=len(i)).tolist() == col
            np.testing.assert_array_equal(win[:, V:].numpy(), view_windows(r, sizes_of(index, n), st.boxes(n), V,
                                                                           cfg.crop))
        # uniform over the k columns: chi-square with k-1 = 2 degrees of freedom, p = 0.001 cut-off 13.8
        counts = np.bincount(columns, minlength=k)
        assert ((counts - len(columns) / k) ** 2 / (len(columns) / k)).sum() < 13.8
        # pixels: without photometric augmentation the companion views are the neighbour's window pixels
        check = ViewPixels(backend, converted)
        loader = make(backend, replace(cfg, augment=PLAIN), st, companions=True)
        for views, _, idx, nb, win in loader:
            for row, (a, m) in enumerate(zip(idx.tolist(), nb.tolist())):
                for v in range(V):
                    check.add(views[V + v][row], m, win[row, V + v].tolist(), a)  # other: the sample's own image
        check.verify()
        # the check can tell images apart: a neighbour's view is not the sample's whole image
        H, W = check.shape(idx[0].item())
        assert np.abs(pixels(views[V][0]) - check.crop(idx[0].item(), [0, 0, H, W])).mean() > 5
        # a neighbour update published after the consumer received batch 1 is used from batch 1 + prefetch on
        it = iter(loader)
        for _ in range(2):
            next(it)
        st.set_neighbours(np.repeat(np.arange(N, dtype=np.int32)[:, None], k, 1))
        rest = list(it)[loader.prefetch - 1 :]
        assert rest and all(torch.equal(nb, idx) for _, _, idx, nb, _ in rest)
    with pytest.raises(ViewpipeError, match="neighbour table"):
        make(backend, cfg, None, companions=True)


def test_ranks_partition_each_epoch(backend: str, make: Callable) -> None:
    """Rank r of w visits `epoch_batches(n, cfg, epoch, r, w)`: every sample once across the ranks, equal batch
    counts (96 samples over 5 ranks in batches of 19: rank 0 holds 20, the others 19 and split their last
    batch); a rank outside the world is an error."""
    cfg = cfg_(backend, batch_size=7, drop_last=False, augment=PLAIN)
    seen: dict[int, list] = {0: [], 1: []}
    for rank in (0, 1):
        loader = make(backend, cfg, rank=rank, world=2)
        assert (loader.rank, loader.world) == (rank, 2)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            assert len(loader) == -(-(N // 2) // 7)
            got = [idx for _, _, idx, *_ in loader]
            assert [g.tolist() for g in got] == [x.tolist() for x in epoch_batches(N, cfg, epoch, rank, 2)]
            assert len(got) == len(loader)
            seen[epoch] += [i for idx in got for i in idx.tolist()]
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(N))
    lengths = []
    for rank in range(5):
        loader = make(backend, replace(cfg, batch_size=19), rank=rank, world=5)
        lengths.append([len(idx) for _, _, idx, *_ in loader])
    assert lengths == [[19, 1]] + [[18, 1]] * 4
    with pytest.raises(ViewpipeError, match="outside world size"):
        make(backend, cfg, rank=2, world=2)


# Python >= 3.12 has no distutils, which ffcv 1.0.2 imports: hide the standard library's and setuptools' start-up
# shim (as when its .pth does not run), so that only the FFCV backend's fallback (importing setuptools) can
# provide it.
NO_STDLIB_DISTUTILS = """
    import importlib.machinery, sys
    class NoStdlibDistutils:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "distutils":
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is not None and "setuptools" not in (spec.origin or ""):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "_distutils_hack"]
    for m in [m for m in sys.modules if m.partition(".")[0] == "distutils"]:
        del sys.modules[m]
    assert "setuptools" not in sys.modules
    sys.meta_path.insert(0, NoStdlibDistutils())
"""


@pytest.fixture(scope="module")
def gloo_runs(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two processes in one gloo group, each running every backend's loader for epochs 0 and 1 with rank and
    world left to torch.distributed: backend → the samples each rank saw per epoch, or the error. One pair of
    processes for all backends (their start-up and FFCV's compilation are most of the time). They run without
    the standard library's distutils (Python 3.12's situation): FFCV loads with setuptools' distutils."""
    rendezvous = tmp_path_factory.mktemp("gloo") / "rendezvous"
    code = f"""
        import json, os, traceback, torch, torch.distributed as dist
        from viewpipe.augment import AugmentConfig, ViewAugment
        from viewpipe.pipelines import LoaderConfig, get_backend
        torch.set_num_threads(1)
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{rendezvous}", rank=rank, world_size=2)
        plain = AugmentConfig(size=16, views=(ViewAugment(flip=0, jitter_p=0, grayscale=0, blur=0),))
        results = {{}}
        for name, kw in {ON_CPU!r}.items():
            seen, error = {{}}, None
            try:
                cfg = LoaderConfig(batch_size=10, drop_last=False, augment=plain, workers=0 if name == "torch" else 1,
                                   **kw)
                loader = get_backend(name)("{converted}", cfg)
                assert (loader.rank, loader.world) == (rank, 2)
                if name == "ffcv":
                    assert loader._loader.distributed
                    assert "setuptools" in sys.modules["distutils"].__file__
                for epoch in (0, 1):
                    loader.set_epoch(epoch)
                    seen[epoch] = [i for _, _, idx, *_ in loader for i in idx.tolist()]
                loader.close()
            except Exception:
                error = traceback.format_exc()
            out = [None, None]
            dist.all_gather_object(out, {{"seen": seen, "error": error}})
            results[name] = out
        if rank == 0:
            print(json.dumps(results), flush=True)
        dist.destroy_process_group()
        # Seen about once in 30 CI runs: an abort during interpreter teardown ("terminate called without an
        # active exception": a native thread of numba's threading layer or gloo destroyed while joinable) after
        # everything above has run. What this test checks is done; skip the teardown.
        sys.stderr.flush()
        os._exit(0)
    """
    code = textwrap.dedent(NO_STDLIB_DISTUTILS) + textwrap.dedent(code)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


def test_two_gloo_processes_partition_each_epoch(backend: str, gloo_runs: dict) -> None:
    """Rank and world come from torch.distributed when it is initialised."""
    ranks = gloo_runs[backend]
    for r in ranks:
        assert r["error"] is None, r["error"]
    for epoch in ("0", "1"):
        assert sorted(ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]) == list(range(N))
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]


def test_order_is_a_function_of_seed_and_epoch(backend: str, make: Callable) -> None:
    """The epoch's order is `epoch_order(n, seed, epoch)`, the same for a fresh loader and again after
    set_epoch; an interrupted epoch starts again at batch 0, and a newer iterator retires the old one; no
    shuffle: the index order."""
    cfg = cfg_(backend, augment=PLAIN)
    a, b = make(backend, cfg), make(backend, cfg)
    e1 = sequence(a, 1)
    assert e1 == sequence(b, 1)  # a fresh loader set to epoch 1 sees the same order
    assert e1 == epoch_order(N, 3, 1)[: len(e1)].tolist() == [i for x in a.batches(1) for i in x.tolist()]
    assert sequence(a, 2) != e1
    assert sequence(a, 1) == e1  # set_epoch back: the same order again
    it = iter(a)  # an interrupted epoch: the next iteration starts cleanly at batch 0
    next(it)
    del it
    assert sequence(a, 1) == e1
    it = iter(a)
    next(it)
    a.set_epoch(1)
    assert sequence(a, 1) == e1
    assert list(it) == []  # the newer iteration retired it
    c = make(backend, cfg_(backend, shuffle=False, drop_last=False, augment=PLAIN))
    assert sequence(c, 4) == list(range(N))


def test_views_are_reproducible_and_leave_the_global_rng_alone(backend: str, make: Callable) -> None:
    """The augmented views are a function of (seed, epoch, batch): not of the caller's torch RNG, which the
    loader does not move; another seed gives other views."""
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = list(zip(range(3), make(backend, cfg_(backend))))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    b = list(zip(range(3), make(backend, cfg_(backend))))
    same_batches([x for _, x in a], [x for _, x in b])
    c = list(zip(range(3), make(backend, cfg_(backend, seed=4))))
    assert not torch.equal(a[0][1][0][0], c[0][1][0][0])


def test_resume_mid_epoch_replays_the_same_batches(backend: str, make: Callable) -> None:
    """A loader resumed from `state_dict()` (even with another number of workers) yields the remaining batches
    exactly (mocov2 views); a completed epoch moves on to the next; the interrupted loader itself continues
    where it stopped, then starts the next epoch; after close() it replays a state again."""
    cfg = cfg_(backend, workers=2)
    full = make(backend, cfg)
    full.set_epoch(2)
    reference = list(full)
    assert full.state_dict() == {"epoch": 3, "batch": 0, "decode_failures": {}}
    first = make(backend, cfg)
    first.set_epoch(2)
    for _ in zip(range(5), first):
        pass
    sd = first.state_dict()
    assert sd == {"epoch": 2, "batch": 5, "decode_failures": {}}
    resumed = make(backend, replace(cfg, workers=0))
    resumed.load_state_dict(sd)
    rest = list(resumed)
    same_batches(reference[5:], rest)
    assert resumed.state_dict() == {"epoch": 3, "batch": 0, "decode_failures": {}}
    same_batches(list(first), rest)
    assert [b.indices.tolist() for b in first] == [x.tolist() for x in first.batches(3)]
    first.close()
    first.load_state_dict(sd)
    same_batches(list(first), rest)


def test_state_errors(backend: str, make: Callable, state_name: str) -> None:
    """A state of another size is refused when the loader is made; an error while a batch is planned (here:
    the state's tables are gone) reaches the consumer as it is, from whichever thread planned (FFCV's: instead
    of a hang)."""
    with SampleState.create(N - 1, name=state_name) as st:
        with pytest.raises(ViewpipeError, match=f"{N - 1} rows but the data has {N} samples"):
            make(backend, cfg_(backend), st)
    with SampleState.create(N, name=state_name) as st:
        loader = make(backend, cfg_(backend), st)
    with pytest.raises(ViewpipeError, match="no boxes table"):
        list(loader)


@pytest.mark.parametrize("other", ["dali", "ffcv"])
def test_same_plan_as_the_reference(other: str, make: Callable, image_folder: Path, state_name: str) -> None:
    """For the same seed, epoch and state every backend yields the reference's batches: labels, indices,
    companions and windows (the reference over the image folder, the others over its conversion, with and
    without companions and workers), and views within the resize difference of the reference's."""
    rng = np.random.default_rng(5)
    k = 3
    table = np.stack([rng.permutation(N) for _ in range(k)], 1).astype(np.int32)
    diffs = []
    with SampleState.create(N, name=state_name, neighbours=k) as st:
        st.set_boxes(random_boxes(N, 5))
        st.set_neighbours(table)
        for companions, workers in ((False, 0), (True, 2)):
            cfg = cfg_("torch", augment=PLAIN, crop=CropConfig(alpha=0.6), workers=workers, drop_last=False,
                       batch_size=10)
            ours = make("torch", cfg, st, data=image_folder, companions=companions)
            theirs = make(other, cfg, st, companions=companions)
            ours.set_epoch(2), theirs.set_epoch(2)
            a, b = list(ours), list(theirs)
            assert len(a) == len(b) == 10
            for x, y in zip(a, b):
                assert (x.neighbours is None) == (y.neighbours is None) == (not companions)
                assert all(u is v is None or torch.equal(u, v) for u, v in zip(x[1:], y[1:]))  # labels ... windows
                assert x.windows.shape[1] == (4 if companions else 2)
                diffs += [(u - v).abs().mean().item() * 255 for u, v in zip(x.views, y.views)]
    print(f"reference vs {other} views: mean {np.mean(diffs):.3f}, per-view max {max(diffs):.3f} grey levels "
          f"over {len(diffs)} views")
    # DALI's linear + antialias resize against PIL's bilinear: 0.16 grey levels on average. FFCV's views are the
    # core crop-resize (roi_align) of libjpeg-turbo's fast-DCT decode: measured 2.4 on average, per view at most
    # 2.7 (each is exactly its own reference: test_windows_follow_the_sampler_and_views_are_their_pixels)
    mean, most = {"dali": (0.5, 2.0), "ffcv": (3.0, 4.0)}[other]
    assert np.mean(diffs) < mean and max(diffs) < most, (np.mean(diffs), max(diffs))
