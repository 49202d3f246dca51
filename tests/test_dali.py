"""The DALI backend in DALI's CPU-only mode (`device_id=None`): shapes, windows, ROI axis order against a PIL
crop, live box updates, rank sharding and the (seed, epoch) order."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: E402,F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import check_batches, check_resumed  # noqa: E402
from viewpipe.augment import AugmentConfig, ViewAugment, preset  # noqa: E402
from viewpipe.crop import CropConfig, draw, view_windows, windows_from_draws  # noqa: E402
from viewpipe.errors import ViewpipeError  # noqa: E402
from viewpipe.formats import DatasetIndex, open_image, shard_paths  # noqa: E402
from viewpipe.pipelines import LoaderConfig, get_backend  # noqa: E402
from viewpipe.pipelines import epoch_order  # noqa: E402
from viewpipe.pipelines.dali import dali_loader  # noqa: E402
from viewpipe.state import SampleState  # noqa: E402
from viewpipe.tools.convert import convert  # noqa: E402

S = 32
# photometric augmentation off, no normalisation: views are the resized crops / 255
PLAIN = AugmentConfig(size=S, views=(ViewAugment(flip=0, jitter_p=0, grayscale=0, blur=0),), mean=(0, 0, 0),
                      std=(1, 1, 1))
# Measured (DALI 2.4 CPU, generated JPEGs 40-96 px, S=32, 192 views): the decodes are identical; the
# resizes (DALI linear + antialias vs PIL BILINEAR with a box) differ by mean 0.16 grey levels, 99.9th
# percentile 1, max 10 (a few pixels); the same crops with the ROI read as (x, y) differ by 26 on average.
PIL_MEAN_DIFF = 0.5
PIL_P999_DIFF = 2.0
PIL_MAX_DIFF = 16.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("dali") / "ds"
    convert(image_folder, dst, formats=("dali",), workers=1, shard_size=32)
    return dst


def cfg_(**kw) -> LoaderConfig:
    base = dict(views=2, batch_size=8, augment=preset("mocov2", size=S), workers=2, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


def expected_windows(index: DatasetIndex, cfg: LoaderConfig, indices: np.ndarray, boxes: np.ndarray,
                     epoch: int, rank: int, batch: int) -> np.ndarray:
    """The windows the core sampler gives for the loader's documented draws (keyed by seed, epoch, rank, batch)."""
    V, B = cfg.views, len(indices)
    rng = np.random.default_rng([cfg.seed, epoch, rank, batch])
    sizes = np.stack([index.heights[indices], index.widths[indices]], 1)
    win = windows_from_draws(np.tile(sizes, (V, 1)), np.tile(boxes, (V, 1)), draw(rng, V * B, cfg.crop), cfg.crop)
    return win.reshape(V, B, 4).transpose(1, 0, 2)


def test_registered() -> None:
    assert get_backend("dali") is dali_loader


def test_shapes_labels_and_length(dataset: Path) -> None:
    index = DatasetIndex.load(dataset)
    for drop_last, n_batches, last in ((True, 96 // 10, 10), (False, 10, 6)):
        cfg = cfg_(views=3, batch_size=10, drop_last=drop_last)
        loader = dali_loader(dataset, cfg, device_id=None)
        assert len(loader) == n_batches
        batches = list(loader)
        assert len(batches) == n_batches
        seen = check_batches(batches, index.labels, 3, S)
        assert len(batches[-1][2]) == last
        assert len(set(seen)) == len(seen)
        # two views of the same image differ (independent crops and augmentations)
        assert not torch.equal(batches[0][0][0], batches[0][0][1])


def test_windows_follow_the_sampler_and_roi_axis_order(dataset: Path) -> None:
    """DALI's resize gets (y, x) ROIs: its crops match PIL crops of the same (top, left, h, w) windows."""
    index = DatasetIndex.load(dataset)
    assert (index.heights != index.widths).sum() > 48  # mostly non-square images
    cfg = cfg_(augment=PLAIN, crop=CropConfig(use_box=False))
    loader = dali_loader(dataset, cfg, device_id=None)
    loader.set_epoch(1)
    diffs, swapped, nonsquare = [], [], 0
    for b, (views, _, indices, _, windows) in enumerate(loader):
        idx = indices.numpy()
        full = np.tile([0.0, 0.0, 1.0, 1.0], (len(idx), 1))
        np.testing.assert_array_equal(windows.numpy(), expected_windows(index, cfg, idx, full, 1, 0, b))
        for n, k in enumerate(idx.tolist()):
            tar, _ = shard_paths(dataset, int(index.shards[k]))
            with open(tar, "rb") as f:
                f.seek(int(index.offsets[k]))
                img = open_image(f.read(int(index.nbytes[k])))
            assert (img.height, img.width) == (index.heights[k], index.widths[k])
            for v in range(cfg.views):
                top, left, h, w = windows[n, v].tolist()
                nonsquare += h != w
                ref = np.asarray(img.resize((S, S), 2, box=(left, top, left + w, top + h)), dtype=np.float32)
                got = views[v][n].permute(1, 2, 0).numpy() * 255.0
                diffs.append(np.abs(got - ref))
                # what DALI would give if it read the ROI as (x, y): clearly different
                if h != w and top + h <= img.width and left + w <= img.height:
                    alt = np.asarray(img.resize((S, S), 2, box=(top, left, top + h, left + w)), dtype=np.float32)
                    swapped.append(np.abs(got - alt).mean())
    d = np.stack(diffs)
    print(f"DALI vs PIL crop+resize: max {d.max():.2f}, mean {d.mean():.3f} grey levels over {len(diffs)} views; "
          f"axis-swapped mean {np.mean(swapped):.1f}; p99.9 {np.percentile(d, 99.9):.2f}; "
          f"per-view mean max {d.mean(axis=(1, 2, 3)).max():.3f}")
    assert nonsquare > len(diffs) // 2
    assert d.mean() <= PIL_MEAN_DIFF and np.percentile(d, 99.9) <= PIL_P999_DIFF and d.max() <= PIL_MAX_DIFF
    assert np.mean(swapped) > 5 * d.mean()


@pytest.mark.parametrize("prefetch,overlap", [(1, False), (2, False), (3, False), (2, True)])
def test_box_update_reaches_the_running_loader(dataset: Path, state_name: str, prefetch: int, overlap: bool) -> None:
    """An update published after the consumer received batch k is used from batch k + prefetch on (one batch
    later with the overlap's look-ahead)."""
    index = DatasetIndex.load(dataset)
    N = len(index)
    cfg = cfg_(augment=PLAIN, crop=CropConfig(alpha=0.6))
    new_box = np.array([0.0, 0.0, 0.25, 0.3], dtype=np.float32)
    with SampleState.create(N, name=state_name) as st:
        loader = dali_loader(dataset, cfg, st, device_id=None, prefetch=prefetch,
                             overlap=overlap)
        assert loader.prefetch == prefetch + overlap
        update_after, changed = 3, 0
        for b, (_, _, indices, _, windows) in enumerate(loader):
            idx, win = indices.numpy(), windows.numpy()
            old = expected_windows(index, cfg, idx, np.tile([0.0, 0.0, 1.0, 1.0], (len(idx), 1)), 0, 0, b)
            new = expected_windows(index, cfg, idx, np.tile(new_box, (len(idx), 1)), 0, 0, b)
            if b <= update_after:
                np.testing.assert_array_equal(win, old)
            elif b < update_after + prefetch:  # requested by DALI before the update: still the old boxes
                np.testing.assert_array_equal(win, old)
            if b >= update_after + loader.prefetch:  # the documented bound
                np.testing.assert_array_equal(win, new)
                changed += not np.array_equal(new, old)
                H, W = index.heights[idx][:, None], index.widths[idx][:, None]
                top, left, h, w = (win[..., i] for i in range(4))
                top_hi = np.clip((H * new_box[2]).astype(int) - h // 2, 0, H - h)
                left_hi = np.clip((W * new_box[3]).astype(int) - w // 2, 0, W - w)
                assert (top >= 0).all() and (top <= top_hi).all() and (left >= 0).all() and (left <= left_hi).all()
            if b == update_after:
                st.set_boxes(np.tile(new_box, (N, 1)))
        assert b == len(loader) - 1 and b >= update_after + loader.prefetch
        assert changed > 0


def test_ranks_partition_each_epoch(dataset: Path) -> None:
    N = len(DatasetIndex.load(dataset))
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = dali_loader(dataset, cfg_(batch_size=7, drop_last=False, augment=PLAIN), device_id=None,
                                 rank=rank, world=2)
            loader.set_epoch(epoch)
            assert len(loader) == -(-(N // 2) // 7)
            seen += [i for _, _, idx, *_ in loader for i in idx.tolist()]
        assert sorted(seen) == list(range(N))
    # 96 samples over 5 ranks in batches of 19: rank 0 has 20 samples, the others 19; all get 2 batches
    lengths = []
    for rank in range(5):
        loader = dali_loader(dataset, cfg_(batch_size=19, drop_last=False, augment=PLAIN), device_id=None,
                             rank=rank, world=5)
        lengths.append([len(idx) for _, _, idx, *_ in loader])
    assert lengths == [[19, 1]] + [[18, 1]] * 4


def test_two_gloo_processes_partition_each_epoch(dataset: Path, tmp_path: Path) -> None:
    """Rank and world come from torch.distributed when it is initialised."""
    code = f"""
        import sys, json, torch, torch.distributed as dist
        from viewpipe.augment import AugmentConfig, ViewAugment
        from viewpipe.pipelines import LoaderConfig
        from viewpipe.pipelines.dali import dali_loader
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
        plain = AugmentConfig(size=16, views=(ViewAugment(flip=0, jitter_p=0, grayscale=0, blur=0),))
        loader = dali_loader("{dataset}", LoaderConfig(batch_size=10, drop_last=False, augment=plain, workers=1),
                             device_id=None)
        assert (loader.rank, loader.world) == (rank, 2)
        seen = {{}}
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen[epoch] = [i for _, _, idx, *_ in loader for i in idx.tolist()]
        out = [None, None]
        dist.all_gather_object(out, seen)
        if rank == 0:
            print(json.dumps(out))
        dist.destroy_process_group()
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    gathered = json.loads(outs[0][0].strip().splitlines()[-1])
    N = len(DatasetIndex.load(dataset))
    for epoch in ("0", "1"):
        assert sorted(gathered[0][epoch] + gathered[1][epoch]) == list(range(N))
    assert gathered[0]["0"] != gathered[0]["1"]


def test_order_is_a_function_of_seed_and_epoch(dataset: Path) -> None:
    def sequence(loader, epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [i for _, _, idx, *_ in loader for i in idx.tolist()]

    a = dali_loader(dataset, cfg_(augment=PLAIN), device_id=None)
    b = dali_loader(dataset, cfg_(augment=PLAIN), device_id=None)
    e1 = sequence(a, 1)
    assert e1 == sequence(b, 1)  # a fresh loader resumed at epoch 1 sees the same order
    assert e1 == epoch_order(96, 3, 1)[: len(e1)].tolist()
    assert sequence(a, 2) != e1
    assert sequence(a, 1) == e1  # set_epoch back: the same order again
    # the augmented views are deterministic too
    a2, b2 = (dali_loader(dataset, cfg_(), device_id=None) for _ in range(2))
    a2.set_epoch(1), b2.set_epoch(1)
    va, vb = next(iter(a2))[0], next(iter(b2))[0]
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    # an interrupted epoch: the next iteration starts cleanly at batch 0
    it = iter(a)
    next(it)
    del it
    assert sequence(a, 1) == e1
    # no shuffle: index order
    c = dali_loader(dataset, cfg_(shuffle=False, drop_last=False, augment=PLAIN), device_id=None)
    assert sequence(c, 4) == list(range(96))


def test_missing_shards_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    from viewpipe.errors import ViewpipeError

    with pytest.raises(ViewpipeError, match="dataset index"):
        dali_loader(tmp_path, cfg_(), device_id=None)


def test_missing_dali_is_a_clear_error(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from viewpipe.errors import ViewpipeError

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ViewpipeError, match=r"NVIDIA DALI is not installed.*viewpipe\[dali\]"):
        dali_loader(dataset, cfg_(), device_id=None)


def test_a_source_gives_the_same_batches_as_its_shards(dataset: Path, image_folder: Path) -> None:
    """Over an image folder (read file by file, sizes from the headers) the loader matches the shards."""
    from viewpipe.sources import open_source

    cfg = cfg_(augment=PLAIN)
    a = list(dali_loader(dataset, cfg, device_id=None))
    b = list(dali_loader(open_source(image_folder), cfg, device_id=None))
    assert len(a) == len(b) == 12
    for (va, la, ia, _, wa), (vb, lb, ib, _, wb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(wa, wb)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))


def crop_of(img, window: list[int]) -> np.ndarray:
    """PIL's crop-and-resize of `window` (top, left, h, w) to S×S, as the float HWC pixels a PLAIN view has."""
    top, left, h, w = window
    return np.asarray(img.resize((S, S), 2, box=(left, top, left + w, top + h)), dtype=np.float32)


def decoded(dataset: Path, index: DatasetIndex, k: int):  # noqa: ANN201  (a PIL image)
    tar, _ = shard_paths(dataset, int(index.shards[k]))
    with open(tar, "rb") as f:
        f.seek(int(index.offsets[k]))
        return open_image(f.read(int(index.nbytes[k])))


def test_companion_views_come_from_the_neighbour(dataset: Path, state_name: str) -> None:
    """With companions, views[V:] are crops of one of the sample's k neighbours, chosen uniformly, with the
    windows the core sampler draws after the sample's own; the sample's own views do not change."""
    index = DatasetIndex.load(dataset)
    N, k = len(index), 3
    table = np.stack([(np.arange(N) + 7 * (j + 1)) % N for j in range(k)], 1).astype(np.int32)
    cfg = cfg_(augment=PLAIN, crop=CropConfig(alpha=0.6))
    with SampleState.create(N, name=state_name, neighbours=k) as st:
        rng = np.random.default_rng(0)
        lo = rng.uniform(0, 0.4, (N, 2))
        st.set_boxes(np.concatenate([lo, lo + 0.5], 1).astype(np.float32))
        st.set_neighbours(table)
        plain = list(dali_loader(dataset, cfg, st, device_id=None))
        loader = dali_loader(dataset, cfg, st, device_id=None, companions=True)
        columns, diffs = [], []
        for b, ((views, labels, idx, nb, win), (pviews, _, pidx, _, pwin)) in enumerate(zip(loader, plain)):
            assert len(views) == 2 * cfg.views and win.shape == (len(idx), 2 * cfg.views, 4)
            assert torch.equal(idx, pidx) and torch.equal(win[:, : cfg.views], pwin)
            assert all(torch.equal(a, p) for a, p in zip(views[: cfg.views], pviews))
            i, n = idx.numpy(), nb.numpy()
            col = [table[a].tolist().index(m) for a, m in zip(i, n)]  # raises if n is not a neighbour of i
            columns += col
            # the companion windows are the core sampler's for the neighbours, drawn after the samples' own
            r = np.random.default_rng([cfg.seed, 0, 0, b])
            sizes = lambda ks: np.stack([index.heights[ks], index.widths[ks]], 1)  # noqa: E731
            view_windows(r, sizes(i), st.boxes(i), cfg.views, cfg.crop)
            assert r.integers(0, k, size=len(i)).tolist() == col
            np.testing.assert_array_equal(win[:, cfg.views :].numpy(),
                                          view_windows(r, sizes(n), st.boxes(n), cfg.views, cfg.crop))
            for row, m in enumerate(n.tolist()):
                img = decoded(dataset, index, m)
                for v in range(cfg.views):
                    got = views[cfg.views + v][row].permute(1, 2, 0).numpy() * 255.0
                    diffs.append(np.abs(got - crop_of(img, win[row, cfg.views + v].tolist())).mean())
        assert max(diffs) < 3 * PIL_MEAN_DIFF + 1  # per view; a different image differs by tens of levels
        # uniform over the k columns: chi-square with k-1 = 2 degrees of freedom, p = 0.001 cut-off 13.8
        counts = np.bincount(columns, minlength=k)
        assert ((counts - len(columns) / k) ** 2 / (len(columns) / k)).sum() < 13.8
        # a neighbour update reaches the running loader like a box update (the prefetch bound)
        it = iter(loader)
        for _ in range(2):
            next(it)
        st.set_neighbours(np.repeat(np.arange(N, dtype=np.int32)[:, None], k, 1))
        rest = list(it)[loader.prefetch :]
        assert rest and all(torch.equal(nb, idx) for _, _, idx, nb, _ in rest)
    with pytest.raises(ViewpipeError, match="neighbour table"):
        dali_loader(dataset, cfg, None, device_id=None, companions=True)


def test_resume_mid_epoch_replays_the_same_batches(dataset: Path) -> None:
    cfg = cfg_()
    full = dali_loader(dataset, cfg, device_id=None)
    full.set_epoch(2)
    reference = list(full)
    assert full.state_dict()["epoch"] == 3 and full.state_dict()["batch"] == 0  # a completed epoch moves on
    first = dali_loader(dataset, cfg, device_id=None)
    first.set_epoch(2)
    for _ in zip(range(5), first):
        pass
    sd = first.state_dict()
    assert sd["epoch"] == 2 and sd["batch"] == 5
    resumed = dali_loader(dataset, cfg, device_id=None)
    resumed.load_state_dict(sd)
    rest = list(resumed)
    check_resumed(reference[5:], rest)
    # the interrupted loader itself continues where it stopped
    assert [idx.tolist() for _, _, idx, *_ in first] == [idx.tolist() for _, _, idx, *_ in rest]


def test_a_sample_that_fails_to_decode_is_replaced_and_counted(dataset: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture) -> None:
    """A file damaged after conversion (its header overwritten) does not stop the epoch: the sample is
    replaced by the next one, reported once on stderr and in `decode_failures`, and remembered on resume."""
    import shutil

    index = DatasetIndex.load(dataset)
    damaged = tmp_path / "ds"
    shutil.copytree(dataset, damaged)
    bad = int(epoch_order(len(index), 3, 0)[13])  # in batch 1
    tar, _ = shard_paths(damaged, int(index.shards[bad]))
    with open(tar, "r+b") as f:
        f.seek(int(index.offsets[bad]))
        f.write(b"\0" * 64)
    cfg = cfg_(augment=PLAIN)
    good = list(dali_loader(dataset, cfg, device_id=None))
    loader = dali_loader(damaged, cfg, device_id=None)
    got = list(loader)
    assert len(got) == len(good)
    assert list(loader.decode_failures) == [bad]
    err = capfd.readouterr().err
    assert err.count("fails to decode") == 1 and f"sample {bad} " in err and str(tar) in err
    for b, ((va, _, ia, *_), (vb, _, ib, *_)) in enumerate(zip(good, got)):
        expect = ia.clone()
        expect[expect == bad] = (bad + 1) % len(index)
        assert torch.equal(ib, expect)
        assert len(ib) == cfg.batch_size
        if b != 1:  # the other batches are untouched
            assert all(torch.equal(x, y) for x, y in zip(va, vb))
    # the replacement is part of the loader's state: a resumed run does not need to find it again
    sd = loader.state_dict()
    again = dali_loader(damaged, cfg, device_id=None)
    again.load_state_dict(sd | {"epoch": 0, "batch": 1})
    assert [idx.tolist() for _, _, idx, *_ in again] == [idx.tolist() for _, _, idx, *_ in got[1:]]
    assert "fails to decode" not in capfd.readouterr().err


def test_decode_only_reads_every_sample_of_the_epoch(dataset: Path) -> None:
    """The decode ceiling `viewpipe bench` reports: the same batches, decoded and nothing else."""
    cfg = cfg_(drop_last=False)
    plain = [idx.tolist() for _, _, idx, *_ in dali_loader(dataset, cfg, device_id=None)]
    only = list(dali_loader(dataset, cfg, device_id=None, decode_only=True))
    assert [idx.tolist() for _, _, idx, *_ in only] == plain and all(v is None for v, *_ in only)
