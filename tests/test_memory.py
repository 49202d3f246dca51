"""The memory backend (`viewpipe.pipelines.memory`): the dataset decoded once into (device) memory, every batch
planned by the shared Planner, cut and augmented there. On the CPU here; the same code runs on a GPU with the
fused kernels."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build, check_resumed
from viewpipe.augment import AugmentConfig, ViewAugment, crop_resize, preset, to_nchw
from viewpipe.crop import CropConfig
from viewpipe.formats import DatasetIndex, open_image
from viewpipe.pipelines import LoaderConfig, epoch_order, get_backend, parse_views
from viewpipe.pipelines.memory import MemoryLoader, decode_all, MemoryLoader
from viewpipe.sources import FolderSource, open_source
from viewpipe.state import SampleState
from viewpipe.convert import convert

pytestmark = pytest.mark.usefixtures("one_torch_thread")
S = 24
PLAIN = AugmentConfig(size=S, views=(ViewAugment(flip=0, jitter_p=0, grayscale=0, blur=0),), mean=(0, 0, 0),
                      std=(1, 1, 1))


@pytest.fixture(scope="module")
def dataset(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("memory") / "ds"
    convert(image_folder, dst, formats=("dali",), workers=1, shard_size=32)
    return dst


def cfg_(**kw) -> LoaderConfig:
    base = dict(views=2, batch_size=16, augment=preset("mocov2", size=S), workers=2, seed=7)
    return LoaderConfig(**(base | kw))


def test_decode_all_pads_with_the_edge(dataset: Path) -> None:
    src = open_source(dataset)
    images, sizes, failed = decode_all(src, 2, progress=False)
    assert not failed and images.shape == (len(src), *sizes.max(0), 3)
    for k in (0, 5, 50):
        h, w = sizes[k]
        img = np.asarray(open_image(src.read(k)))
        np.testing.assert_array_equal(images[k, :h, :w], img)
        assert (images[k, h:, :w] == img[-1:]).all() and (images[k, :, w:] == images[k, :, w - 1 : w]).all()


def test_batches_windows_and_views_match_the_dali_backend(dataset: Path, state_name: str) -> None:
    """The same plan as every backend (windows identical to DALI's for the same seed, epoch and boxes), views
    that are those crops of the decoded images, labels and indices of the epoch order."""
    index = DatasetIndex.load(dataset)
    cfg = cfg_(augment=PLAIN, crop=CropConfig(alpha=0.6))
    with SampleState.create(len(index), name=state_name) as st:
        st.set_boxes(np.tile(np.array([0.1, 0.2, 0.6, 0.9], np.float32), (len(index), 1)))
        mem = build(get_backend("memory"), dataset, cfg, st)
        dali = build(get_backend("dali"), dataset, cfg, st, device="cpu")
        mem.set_epoch(3), dali.set_epoch(3)
        a, b = list(mem), list(dali)
    assert isinstance(mem, MemoryLoader) and len(a) == len(b) == len(index) // 16
    src = open_source(dataset)
    order = np.concatenate([x.indices.numpy() for x in a])
    np.testing.assert_array_equal(order, epoch_order(len(index), 7, 3)[: len(order)])
    diffs = []
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.windows, y.windows) and x.neighbours is None
        for v in range(2):
            assert x.views[v].shape == (16, 3, S, S) and x.views[v].dtype == torch.float32
            diffs.append((x.views[v] - y.views[v]).abs().mean().item() * 255)  # roi_align vs DALI's resize
        k, (top, left, h, w) = int(x.indices[0]), x.windows[0, 1].tolist()
        img = to_nchw(torch.from_numpy(np.array(open_image(src.read(k))))[None], "hwc")
        expect = crop_resize(img, torch.tensor([[[top, left, h, w]]]), S)[0] / 255
        torch.testing.assert_close(x.views[1][0], expect, atol=1e-4, rtol=0)
    assert np.mean(diffs) < 2.0  # grey levels: roi_align vs DALI's antialiased linear resize (measured 1.2 here)


def test_photometric_views_equal_the_dali_backend_for_the_same_plan(dataset: Path) -> None:
    """Same plan and seed: the same photometric draws, so the views differ only by the resize (blur off: it
    spreads the resize difference)."""
    aug = preset("simclr", size=S)
    aug = AugmentConfig(size=S, views=tuple(v.__class__(**{**v.__dict__, "blur": 0.0}) for v in aug.views))
    cfg = cfg_(augment=aug)
    a = list(build(MemoryLoader, dataset, cfg))[:3]
    b = list(build(get_backend("dali"), dataset, cfg, device="cpu"))[:3]
    for x, y in zip(a, b):
        assert torch.equal(x.windows, y.windows)
        for u, v in zip(x.views, y.views):  # normalised units (0.05: about 3 grey levels on average)
            assert (u - v).abs().mean().item() < 0.05
        assert (x.views[0] - y.views[1]).abs().mean().item() > 0.3  # other draws and windows: far apart


def test_live_update_bound_ranks_resume_and_companions(dataset: Path, state_name: str) -> None:
    index = DatasetIndex.load(dataset)
    N, cfg = len(index), cfg_(augment=PLAIN, crop=CropConfig(alpha=0.6), batch_size=8)
    with SampleState.create(N, name=state_name, neighbours=2) as st:
        st.set_neighbours(np.stack([(np.arange(N) + 1) % N, (np.arange(N) + 2) % N], 1).astype(np.int32))
        loader = build(MemoryLoader, dataset, cfg, st, companions=True, overlap=True)
        assert loader.prefetch == 2
        new_box, update_after = np.array([0.0, 0.0, 0.2, 0.2], np.float32), 2
        for b, batch in enumerate(loader):
            assert len(batch.views) == 4 and batch.windows.shape == (8, 4, 4)
            i, nb = batch.indices.numpy(), batch.neighbours.numpy()
            assert ((nb == (i + 1) % N) | (nb == (i + 2) % N)).all()
            top, h = batch.windows[:, :2, 0].numpy(), batch.windows[:, :2, 2].numpy()
            H = index.heights[i][:, None]
            if b >= update_after + loader.prefetch:  # the new box, the top fifth: the corner's upper bound
                assert (top <= np.clip((H * new_box[2]).astype(int) - h // 2, 0, H - h)).all()
            if b == update_after:
                st.set_boxes(np.tile(new_box, (N, 1)))
        # companions are crops of the neighbour's image with the neighbour's windows
        src = open_source(dataset)
        k, (top, left, h, w) = int(batch.neighbours[0]), batch.windows[0, 2].tolist()
        img = to_nchw(torch.from_numpy(np.array(open_image(src.read(k))))[None], "hwc")
        torch.testing.assert_close(batch.views[2][0], crop_resize(img, torch.tensor([[[top, left, h, w]]]), S)[0] / 255,
                                   atol=1e-4, rtol=0)
    # ranks partition the epoch; resume replays the rest exactly
    seen = [i for r in range(3) for x in build(MemoryLoader, dataset, cfg, rank=r, world=3) for i in x.indices.tolist()]
    assert len(seen) == len(set(seen)) == (N // 3 // 8) * 8 * 3
    full = list(build(MemoryLoader, dataset, cfg))
    first = build(MemoryLoader, dataset, cfg)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    again = build(MemoryLoader, dataset, cfg)
    again.load_state_dict(first.state_dict())
    check_resumed(full[4:], list(again))
    check_resumed(full[:4], head)


def test_multicrop_and_a_damaged_image(image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    bad = FolderSource(root).paths[9]
    Path(bad).write_bytes(b"not an image")
    cfg = cfg_(groups=parse_views("2x24,3x12@0.05-0.2"), augment=preset("mocov2", size=24), drop_last=False)
    loader = build(MemoryLoader, root, cfg)
    batches = list(loader)
    assert [tuple(v.shape[1:]) for v in batches[0].views] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    seen = [k for x in batches for k in x.indices.tolist()]
    assert 9 not in seen and seen.count(10) == 2 and list(loader.decode_failures) == [9]
    assert "fails to decode" in capfd.readouterr().err
