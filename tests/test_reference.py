"""The reference loader (PIL + DataLoader) with the interface of the DALI and FFCV backends: shapes, the DALI
backend's windows, exact mid-epoch resume, ranks, companions, the live-state bound, the (seed, epoch) order."""

from __future__ import annotations

import io
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from viewpipe.augment import AugmentConfig, ViewAugment, preset
from viewpipe.crop import CropConfig, view_windows
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import LoaderConfig, epoch_batches, get_backend
from viewpipe.pipelines.reference import ReferenceLoader, decode_rgb, reference_loader
from viewpipe.sources import FolderSource
from viewpipe.state import SampleState

S = 32
# photometric augmentation off, no normalisation: views are PIL's resized crops / 255
PLAIN = AugmentConfig(size=S, views=(ViewAugment(flip=0, jitter_p=0, grayscale=0, blur=0),), mean=(0, 0, 0),
                      std=(1, 1, 1))
FULL = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)


def _cfg(**kw) -> LoaderConfig:
    base = LoaderConfig(views=2, batch_size=8, augment=preset("mocov2", size=S), workers=0, seed=3)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def images(image_folder: Path) -> list:
    """The folder's images decoded as every loader decodes them (RGB, EXIF applied)."""
    src = FolderSource(image_folder)
    return [decode_rgb(src.read(k), src.describe(k)) for k in range(len(src))]


def sizes_of(images: list, indices: np.ndarray) -> np.ndarray:
    return np.array([[images[k].height, images[k].width] for k in indices.tolist()])


def crop_of(img, window: list[int]) -> np.ndarray:  # noqa: ANN001  (a PIL image)
    """PIL's crop-and-resize of `window` (top, left, h, w) to S×S, as the float HWC pixels of a PLAIN view."""
    top, left, h, w = window
    return np.asarray(img.resize((S, S), Image.BILINEAR, box=(left, top, left + w, top + h)), dtype=np.float32)


def pixels(view: torch.Tensor) -> np.ndarray:
    """A PLAIN view (3, S, S) in [0, 1] as HWC grey levels."""
    return view.permute(1, 2, 0).numpy() * 255.0


def same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        assert len(x[0]) == len(y[0]) and all(torch.equal(u, v) for u, v in zip(x[0], y[0]))
        assert all(u is v is None or torch.equal(u, v) for u, v in zip(x[1:], y[1:]))


def test_batches_have_views_labels_indices(image_folder: Path) -> None:
    src = FolderSource(image_folder)
    assert get_backend("torch") is reference_loader
    loader = reference_loader(src, _cfg(views=3, augment=preset("byol", size=24)))
    assert isinstance(loader, ReferenceLoader) and len(loader) == len(src) // 8 == 12
    batches = list(loader)
    assert len(batches) == 12
    for views, labels, idx, *_ in batches:
        assert len(views) == 3
        for v in views:
            assert v.shape == (8, 3, 24, 24) and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert labels.dtype == torch.int64 and idx.dtype == torch.int64 and idx.shape == labels.shape == (8,)
        np.testing.assert_array_equal(labels.numpy(), src.labels[idx.numpy()])
    assert not torch.equal(batches[0][0][0], batches[0][0][1])  # independent crops and augmentations
    # a path is opened as a source; without drop_last every sample once, the last batch smaller
    loader = reference_loader(str(image_folder), _cfg(batch_size=10, drop_last=False, augment=PLAIN))
    got = list(loader)
    assert [len(b[2]) for b in got] == [10] * 9 + [6]
    assert sorted(i for b in got for i in b[2].tolist()) == list(range(96))
    assert got[-1].windows.shape == (6, 2, 4) and got[-1].windows.dtype == torch.int32


def test_windows_follow_the_box(image_folder: Path, images: list, state_name: str) -> None:
    """Every window is the core sampler's for the batch's documented draws, inside its image and placed by
    the box: (seed, epoch, rank, batch) → `view_windows` with the decoded sizes and the state's boxes."""
    src = FolderSource(image_folder)
    cfg = _cfg(augment=PLAIN, crop=CropConfig(alpha=0.5, scale=(0.05, 0.1)))
    with SampleState.create(len(src), name=state_name) as st:
        st.set_boxes(np.tile(np.array([0.5, 0.5, 0.9, 0.9], np.float32), (len(src), 1)))
        loader = reference_loader(src, cfg, st)
        loader.set_epoch(4)
        for b, (views, _, idx, _, win) in enumerate(loader):
            i = idx.numpy()
            rng = np.random.default_rng([cfg.seed, 4, 0, b])
            np.testing.assert_array_equal(win.numpy(), view_windows(rng, sizes_of(images, i), st.boxes(i),
                                                                     cfg.views, cfg.crop))
            for row, k in enumerate(i.tolist()):
                H, W = images[k].height, images[k].width
                for v, (top, left, h, w) in enumerate(win[row].tolist()):
                    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
                    # the crop corner is constrained to the clamped box range
                    assert top >= min(max(int(H * 0.5) - h // 2, 0), H - h)
                    assert left >= min(max(int(W * 0.5) - w // 2, 0), W - w)
                    np.testing.assert_allclose(pixels(views[v][row]), crop_of(images[k], [top, left, h, w]),
                                               atol=1e-3)


def test_windows_equal_the_dali_backends(image_folder: Path, images: list, tmp_path_factory: pytest.TempPathFactory,
                                         state_name: str) -> None:
    """For the same seed, epoch and state the reference loader yields the DALI backend's batches, windows and
    companions (DALI on a converted copy, CPU mode), and views within DALI's resize difference of them."""
    import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

    from viewpipe.pipelines.dali import dali_loader
    from viewpipe.tools.convert import convert

    dataset = tmp_path_factory.mktemp("ref-dali") / "ds"
    convert(image_folder, dataset, formats=("dali",), workers=1, shard_size=32)
    N, k = 96, 3
    rng = np.random.default_rng(5)
    lo = rng.uniform(0, 0.4, (N, 2))
    table = np.stack([rng.permutation(N) for _ in range(k)], 1).astype(np.int32)
    diffs = []
    with SampleState.create(N, name=state_name, neighbours=k) as st:
        st.set_boxes(np.concatenate([lo, lo + 0.5], 1).astype(np.float32))
        st.set_neighbours(table)
        for companions, workers in ((False, 0), (True, 2)):
            cfg = _cfg(augment=PLAIN, crop=CropConfig(alpha=0.6), workers=workers, drop_last=False, batch_size=10)
            ours = reference_loader(image_folder, cfg, st, companions=companions)
            dali = dali_loader(dataset, cfg, st, device_id=None, companions=companions)
            ours.set_epoch(2), dali.set_epoch(2)
            a, b = list(ours), list(dali)
            assert len(a) == len(b) == 10
            for x, y in zip(a, b):
                assert (x.neighbours is None) == (y.neighbours is None) == (not companions)
                assert all(u is v is None or torch.equal(u, v) for u, v in zip(x[1:], y[1:]))  # labels ... windows
                assert x[-1].shape[1] == (4 if companions else 2)
                diffs += [(u - v).abs().mean().item() * 255 for u, v in zip(x[0], y[0])]
    # DALI's linear+antialias resize vs PIL's bilinear: 0.16 grey levels on average (tests/test_dali.py)
    print(f"reference vs DALI views: mean {np.mean(diffs):.3f}, per-view max {max(diffs):.3f} grey levels over {len(diffs)} views")
    assert np.mean(diffs) < 0.5 and max(diffs) < 2.0, (np.mean(diffs), max(diffs))


def test_resume_mid_epoch_replays_identical_batches(image_folder: Path) -> None:
    """A loader resumed from `state_dict()` yields the remaining batches pixel for pixel (mocov2 views, with
    or without workers), and a completed epoch moves on to the next."""
    cfg = _cfg(workers=2)
    full = reference_loader(image_folder, cfg)
    full.set_epoch(2)
    reference = list(full)
    assert full.state_dict() == {"epoch": 3, "batch": 0, "decode_failures": {}}
    first = reference_loader(image_folder, cfg)
    first.set_epoch(2)
    for _ in zip(range(5), first):
        pass
    sd = first.state_dict()
    assert sd == {"epoch": 2, "batch": 5, "decode_failures": {}}
    resumed = reference_loader(image_folder, replace(cfg, workers=0))
    resumed.load_state_dict(sd)
    rest = list(resumed)
    same_batches(reference[5:], rest)
    assert resumed.state_dict() == {"epoch": 3, "batch": 0, "decode_failures": {}}
    # the interrupted loader itself continues where it stopped, then starts the next epoch
    same_batches(list(first), rest)
    assert [b[2].tolist() for b in first] == [b.tolist() for b in first.batches(3)]
    # close() stops the workers; a later iteration starts new ones
    first.close()
    assert first._loader._iterator is None
    first.load_state_dict(sd)
    same_batches(list(first), rest)


def test_augmentations_are_reproducible_and_leave_the_global_rng_alone(image_folder: Path) -> None:
    """torchvision draws from torch's global generator; the loader seeds it per batch and, without workers,
    restores the caller's state: the views do not depend on the caller's RNG and do not move it."""
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = list(zip(range(3), reference_loader(image_folder, _cfg())))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    b = list(zip(range(3), reference_loader(image_folder, _cfg())))
    same_batches([x for _, x in a], [x for _, x in b])
    c = list(zip(range(3), reference_loader(image_folder, _cfg(seed=4))))
    assert not torch.equal(a[0][1][0][0], c[0][1][0][0])


def test_two_ranks_partition_every_epoch(image_folder: Path) -> None:
    cfg = _cfg(batch_size=7, drop_last=False, augment=PLAIN)
    for epoch in (0, 1):
        seen, counts = [], []
        for rank in (0, 1):
            loader = reference_loader(image_folder, cfg, rank=rank, world=2)
            assert (loader.rank, loader.world) == (rank, 2)
            loader.set_epoch(epoch)
            got = [idx for _, _, idx, *_ in loader]
            assert [g.tolist() for g in got] == [x.tolist() for x in epoch_batches(96, cfg, epoch, rank, 2)]
            counts.append(len(got))
            seen += [i for idx in got for i in idx.tolist()]
        assert sorted(seen) == list(range(96)) and counts == [7, 7]
    with pytest.raises(ViewpipeError, match="outside world size"):
        reference_loader(image_folder, cfg, rank=2, world=2)


def test_set_epoch_changes_the_order(image_folder: Path) -> None:
    def sequence(loader: ReferenceLoader, epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [i for _, _, idx, *_ in loader for i in idx.tolist()]

    cfg = _cfg(augment=PLAIN)
    a, b = reference_loader(image_folder, cfg), reference_loader(image_folder, cfg)
    e1 = sequence(a, 1)
    assert e1 == sequence(b, 1) == [i for x in a.batches(1) for i in x.tolist()]  # a fresh loader: the same
    assert sequence(a, 2) != e1
    assert sequence(a, 1) == e1  # set_epoch back: the same order again
    # an interrupted epoch: set_epoch starts it again at batch 0, and a newer iterator retires the old one
    it = iter(a)
    next(it)
    a.set_epoch(1)
    assert sequence(a, 1) == e1
    assert list(it) == []
    # no shuffle: index order
    c = reference_loader(image_folder, _cfg(shuffle=False, drop_last=False, augment=PLAIN))
    assert sequence(c, 4) == list(range(96))


def test_companion_views_come_from_the_neighbour(image_folder: Path, images: list, state_name: str) -> None:
    """views[V:] are PIL crops of one of the sample's k neighbours (uniform over its row) at the windows the
    core sampler draws after the sample's own; the sample's own views are those without companions."""
    N, k, V = 96, 3, 2
    table = np.stack([(np.arange(N) + 7 * (j + 1)) % N for j in range(k)], 1).astype(np.int32)
    with SampleState.create(N, name=state_name, neighbours=k) as st:
        rng = np.random.default_rng(0)
        lo = rng.uniform(0, 0.4, (N, 2))
        st.set_boxes(np.concatenate([lo, lo + 0.5], 1).astype(np.float32))
        st.set_neighbours(table)
        cfg = _cfg(workers=1, crop=CropConfig(alpha=0.6))
        plain = list(reference_loader(image_folder, cfg, st))
        loader = reference_loader(image_folder, cfg, st, companions=True)
        columns = []
        for (views, _, idx, nb, win), (pviews, _, pidx, _, pwin) in zip(loader, plain):  # mocov2 views
            assert len(views) == 2 * V and win.shape == (len(idx), 2 * V, 4) and nb.dtype == torch.int64
            assert torch.equal(idx, pidx) and torch.equal(win[:, :V], pwin)
            assert all(torch.equal(a, p) for a, p in zip(views[:V], pviews))
            columns += [table[a].tolist().index(m) for a, m in zip(idx.tolist(), nb.tolist())]  # raises if not
        counts = np.bincount(columns, minlength=k)  # uniform: chi-square, 2 degrees of freedom, p = 0.001
        assert ((counts - len(columns) / k) ** 2 / (len(columns) / k)).sum() < 13.8
        # pixels: without photometric augmentation the neighbour views are PIL crops of the neighbour's image
        loader = reference_loader(image_folder, replace(cfg, augment=PLAIN), st, companions=True)
        for views, _, idx, nb, win in loader:
            for row, m in enumerate(nb.tolist()):
                for v in range(V):
                    np.testing.assert_allclose(pixels(views[V + v][row]), crop_of(images[m], win[row, V + v].tolist()),
                                               atol=1e-3)
        # the check can tell images apart: the neighbour's crop is not the sample's (whole) image
        own = images[idx[0].item()]
        assert np.abs(pixels(views[V][0]) - crop_of(own, [0, 0, own.height, own.width])).mean() > 5
    with pytest.raises(ViewpipeError, match="neighbour table"):
        reference_loader(image_folder, cfg, None, companions=True)


@pytest.mark.parametrize("workers,prefetch_factor", [(0, 2), (1, 1), (2, 2)])
def test_box_update_reaches_the_running_loader(image_folder: Path, images: list, state_name: str, workers: int,
                                               prefetch_factor: int) -> None:
    """An update published after the consumer received batch u is used by every batch from u + prefetch on
    (each batch wholly old or new). Waiting before the update lets the workers finish what they were handed:
    then exactly the batches before the bound are old, so the bound is also attained."""
    N = 96
    cfg = _cfg(workers=workers, augment=PLAIN, batch_size=4, crop=CropConfig(alpha=0.6))
    new_box = np.array([0.0, 0.0, 0.25, 0.3], dtype=np.float32)
    with SampleState.create(N, name=state_name, neighbours=2) as st:
        st.set_neighbours(np.stack([(np.arange(N) + 1) % N] * 2, 1).astype(np.int32))
        loader = reference_loader(image_folder, cfg, st, companions=True,
                                  prefetch_factor=prefetch_factor)
        assert loader.prefetch == workers * prefetch_factor + 1
        update_after, late = 3, []
        for b, (_, _, idx, nb, win) in enumerate(loader):
            i = idx.numpy()
            expect = {}
            for name, box, shift in (("old", FULL, 1), ("new", new_box, 0)):
                rng = np.random.default_rng([cfg.seed, 0, 0, b])
                own = view_windows(rng, sizes_of(images, i), np.tile(box, (len(i), 1)), cfg.views, cfg.crop)
                rng.integers(0, 2, size=len(i))
                n = (i + shift) % N
                expect[name] = (np.concatenate([own, view_windows(rng, sizes_of(images, n), np.tile(box, (len(i), 1)),
                                                                  cfg.views, cfg.crop)], 1), n)
            got = "old" if np.array_equal(win.numpy(), expect["old"][0]) else "new"
            np.testing.assert_array_equal(win.numpy(), expect[got][0])  # wholly one or the other
            np.testing.assert_array_equal(nb.numpy(), expect[got][1])  # and its neighbour table the same
            if b <= update_after:
                assert got == "old"
            elif b < update_after + loader.prefetch:
                late.append(got)
            else:
                assert got == "new", (b, loader.prefetch)  # the documented bound
            if b == update_after:
                time.sleep(1.0 if workers else 0)  # the workers finish the batches they were handed
                st.set_boxes(np.tile(new_box, (N, 1)))
                st.set_neighbours(np.stack([np.arange(N)] * 2, 1).astype(np.int32))
        assert b == len(loader) - 1 >= update_after + loader.prefetch
        print(f"workers {workers} × prefetch_factor {prefetch_factor}: batches after the update still old: "
              f"{late.count('old')}, bound {loader.prefetch}")
        assert late == ["old"] * (loader.prefetch - 1)
        # the next epoch too, from the same persistent workers
        assert all(torch.equal(nb, idx) for _, _, idx, nb, _ in loader)


def test_state_size_mismatch_is_an_error(image_folder: Path, state_name: str) -> None:
    with SampleState.create(3, name=state_name) as st:
        with pytest.raises(ViewpipeError, match="has 3 rows but the data has"):
            reference_loader(image_folder, _cfg(), st)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_does_not_decode_is_named_and_replaced(image_folder: Path, tmp_path: Path, workers: int,
                                                           capfd: pytest.CaptureFixture) -> None:
    """As in the DALI and FFCV backends: the sample is replaced by the next one for the rest of the run, named
    once on stderr, kept in `decode_failures` (and the state dict); the epoch runs to its end."""
    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    bad = FolderSource(root).paths[17]
    Path(bad).write_bytes(b"not an image")
    loader = reference_loader(root, _cfg(workers=workers, augment=PLAIN, drop_last=False))
    seen = [k for batch in loader for k in batch[2].tolist()]
    err = capfd.readouterr().err
    assert err.count("fails to decode") == 1 and Path(bad).name in err and "replaced by sample 18" in err
    assert list(loader.decode_failures) == [17] and loader.state_dict()["decode_failures"] == loader.decode_failures
    assert 17 not in seen and seen.count(18) == 2 and len(seen) == len(FolderSource(root))


def test_decode_rgb_converts_and_reports() -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 4), 128).save(buf, format="PNG")
    assert decode_rgb(buf.getvalue(), "g.png").mode == "RGB"
    buf = io.BytesIO()
    Image.new("CMYK", (5, 4), (0, 255, 0, 0)).save(buf, format="JPEG")
    img = decode_rgb(buf.getvalue(), "cmyk.jpg")
    assert img.mode == "RGB" and img.getpixel((0, 0))[0] > 200  # magenta-ish: red is high
    with pytest.raises(ViewpipeError, match=r"bad\.jpg: cannot decode image"):
        decode_rgb(b"not an image", "bad.jpg")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    with pytest.raises(ViewpipeError, match=r"cut\.jpg: cannot decode image"):
        decode_rgb(good.getvalue()[:200], "cut.jpg")
