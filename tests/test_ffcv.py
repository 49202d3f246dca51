"""What only the FFCV backend has, on the CPU: one decode per image (counted by the compiled decoder,
companions included), FFCV's distributed mode, live box updates with a large table and exact pixels of raw
samples, the fused option, the stale dispatchers of FFCV's own decoders, damaged JPEG bytes, its errors. The
loader contract every backend meets (shapes, windows and pixels, live updates, companions, ranks and gloo
processes, order, resume) is tests/test_backends.py; the decode-only and stock FFCV loaders `viewpipe bench`
times (viewpipe.pipelines.baselines) are tests/test_bench.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ffcv  # noqa: E402,F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build, FfcvDecoded as Decoded  # noqa: E402
from conftest import core_crop, documented_windows, plain_augment, random_boxes  # noqa: E402
from conftest import loader_cfg as cfg_  # noqa: E402
from viewpipe.crop import CropConfig  # noqa: E402
from viewpipe.errors import ViewpipeError  # noqa: E402
from viewpipe.formats import BETON  # noqa: E402
from viewpipe.pipelines import LoaderConfig  # noqa: E402
from viewpipe.pipelines.ffcv import FfcvLoader  # noqa: E402
from viewpipe.state import SampleState  # noqa: E402

S = 32
PLAIN = plain_augment(S)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(converted: Path) -> Path:
    return converted


BIG_N = 100_000


def big_image(k: int) -> np.ndarray:
    """Pixels of sample k of the large raw dataset: one of 50 random images, 10-16 × 14-18 pixels."""
    j = k % 50
    return np.random.default_rng(j).integers(0, 256, (10 + j % 7, 14 + j % 5, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,000 samples stored raw (FFCV's raw mode, known pixels), written with FFCV's own writer: a boxes
    table of 1.6 MB, above the 1 MB up to which numba copies a captured array into compiled code."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = [big_image(k) for k in range(50)]

    class Data:
        def __len__(self) -> int:
            return BIG_N

        def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
            return images[k % 50], k % 7

    dst = tmp_path_factory.mktemp("ffcv-big")
    DatasetWriter(str(dst / BETON), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Data(), chunksize=8192)
    return dst


def expected_windows(sizes: np.ndarray, cfg: LoaderConfig, boxes: np.ndarray, epoch: int, rank: int,
                     batch: int) -> np.ndarray:
    """The NumPy sampler's windows for the loader's documented draws (keyed by seed, epoch, rank, batch)."""
    return documented_windows(sizes, boxes, cfg, np.random.default_rng([cfg.seed, epoch, rank, batch]))


def ffcv_crop(img: torch.Tensor, window) -> torch.Tensor:  # noqa: ANN001
    """FFCV's own crop-resize (libffcv's `resize_crop`, OpenCV INTER_AREA) of one image: (S, S, 3) float."""
    from ffcv.libffcv import resize_crop

    top, left, h, w = window
    out = np.zeros((S, S, 3), np.uint8)
    resize_crop(np.ascontiguousarray(img.numpy()), top, top + h, left, left + w, out)
    return torch.from_numpy(out).float()


def pixels(view: torch.Tensor) -> torch.Tensor:
    return view.permute(1, 2, 0) * 255.0


def test_one_decode_per_image_companions_included(dataset: Path, state_name: str) -> None:
    """The compiled decoder counts each imdecode call: 3 views per image, one decode per image; with
    companions, one decode per image in a batch (the sample's and its neighbour's); the stated bound."""
    loader = build(FfcvLoader, dataset, cfg_(views=3, batch_size=10), device="cpu")
    assert loader.prefetch == loader.batches_ahead + 2
    seen = [k for batch in loader for k in batch.indices.tolist()]
    assert len(seen) == 90
    expect = np.zeros(96, np.int64)  # (the 6 samples drop_last leaves out: not decoded)
    expect[seen] = 1
    np.testing.assert_array_equal(loader.decodes, expect)
    N, k = 96, 3
    with SampleState.create(N, name=state_name, neighbours=k) as st:
        st.set_neighbours(np.stack([(np.arange(N) + 7 * (j + 1)) % N for j in range(k)], 1).astype(np.int32))
        loader = build(FfcvLoader, dataset, cfg_(augment=PLAIN), st, device="cpu", companions=True)
        appearances = np.zeros(N, np.int64)
        for _, _, idx, nb, _ in loader:
            np.add.at(appearances, idx.numpy(), 1)
            np.add.at(appearances, nb.numpy(), 1)
        np.testing.assert_array_equal(loader.decodes, appearances)


def test_ranks_run_ffcv_distributed(dataset: Path) -> None:
    """With several ranks FFCV runs with `distributed=True` and the backend's order (the partition itself:
    tests/test_backends.py)."""
    assert build(FfcvLoader, dataset, cfg_(), device="cpu", rank=1, world=2)._loader.distributed


def check_update(loader, st: SampleState, sizes, n: int, cfg: LoaderConfig,  # noqa: ANN001
                 stop: int | None = None) -> None:
    """Publish new boxes after the consumer received batch 2: batches up to 2 keep the full-image boxes,
    every batch from 2 + prefetch on uses the new ones (those between may have been planned before)."""
    new_box = np.array([0.05, 0.1, 0.3, 0.35], dtype=np.float32)
    update_after, changed, b = 2, 0, -1
    for b, (_, _, indices, _, windows) in enumerate(loader):
        idx, win = indices.numpy(), windows.numpy()
        old = expected_windows(sizes(idx), cfg, np.tile([0.0, 0.0, 1.0, 1.0], (len(idx), 1)), 0, 0, b)
        new = expected_windows(sizes(idx), cfg, np.tile(new_box, (len(idx), 1)), 0, 0, b)
        if b <= update_after:
            np.testing.assert_array_equal(win, old)
        else:
            assert np.array_equal(win, old) or np.array_equal(win, new)
        if b >= update_after + loader.prefetch:  # the documented bound
            np.testing.assert_array_equal(win, new)
            changed += not np.array_equal(new, old)
        if b == update_after:
            st.set_boxes(np.tile(new_box, (n, 1)))
        if b == stop:
            break
    assert b >= update_after + loader.prefetch and changed > 0


def test_box_update_with_a_large_table_and_exact_pixels_of_raw_samples(big_dataset: Path, state_name: str) -> None:
    """The same bound with 100,000 rows: the boxes are read per batch in Python, never captured by compiled
    code, so the table's size does not matter. Raw samples (FFCV's raw mode) have known pixels: the padded
    decode slots with the repeated edge give exactly the core crop-resize of each image alone."""
    cfg = cfg_(augment=PLAIN, batch_size=64, crop=CropConfig(alpha=0.6))
    sizes = lambda idx: np.array([big_image(k).shape[:2] for k in idx.tolist()])  # noqa: E731
    with SampleState.create(BIG_N, name=state_name) as st:
        assert st.boxes().nbytes > 10**6
        loader = build(FfcvLoader, big_dataset, cfg, st, device="cpu", batches_ahead=2)
        check_update(loader, st, sizes, BIG_N, cfg, stop=9)
        views, labels, indices, _, windows = next(iter(loader))  # the loader is reusable after a break
        assert torch.equal(labels, indices % 7)
        fused = build(FfcvLoader, big_dataset, cfg, st, device="cpu", fused=True)
        fused.load_state_dict(loader.state_dict() | {"batch": loader.state_dict()["batch"] - 1})
        fviews, _, findices, _, fwindows = next(iter(fused))
        assert torch.equal(indices, findices) and torch.equal(windows, fwindows)
        for n, k in enumerate(indices.tolist()):
            for v in range(cfg.views):
                expect = core_crop(torch.from_numpy(big_image(k)), windows[n, v].tolist())
                torch.testing.assert_close(pixels(views[v][n]), expect, atol=1e-3, rtol=0)
                # raw samples through the fused path: FFCV's own crop-resize of the image
                torch.testing.assert_close(pixels(fviews[v][n]), ffcv_crop(torch.from_numpy(big_image(k)),
                                                                            windows[n, v].tolist()), atol=1e-3, rtol=0)


def test_fused_crops_match_the_unfused_path(dataset: Path, state_name: str) -> None:
    """`fused=True` cuts and resizes on FFCV's threads: each view is exactly FFCV's own crop-resize (libffcv's
    `resize_crop`, OpenCV INTER_AREA) of the window in the decoded image, with the same windows, photometric
    draws and one decode per image. Against the default path (roi_align on the device), measured here (40-96 px
    images, S=32, mean grey levels per view): 0.65 where the crop is shrunk (both average over each output
    pixel's footprint; OpenCV rounds to uint8), 0.71 where it is enlarged by at most 1.8× (INTER_AREA zooms
    almost like nearest neighbour: larger enlargements differ more)."""
    decoded = Decoded(dataset)
    cfg = cfg_(views=4, augment=PLAIN, crop=CropConfig(alpha=0.6))
    with SampleState.create(96, name=state_name) as st:
        st.set_boxes(random_boxes(96, 2))
        unfused = list(build(FfcvLoader, dataset, cfg, st, device="cpu"))
        loader = build(FfcvLoader, dataset, cfg, st, device="cpu", fused=True)
        fused = list(loader)
    assert loader.decodes.sum() == 96 and loader.decodes.max() == 1  # 4 views, still one decode per image
    up, down = [], []
    for (va, _, ia, _, wa), (vb, _, ib, _, wb) in zip(unfused, fused):
        assert torch.equal(ia, ib) and torch.equal(wa, wb)
        for n, k in enumerate(ib.tolist()):
            img = decoded(k)
            for v in range(cfg.views):
                torch.testing.assert_close(pixels(vb[v][n]), ffcv_crop(img, wb[n, v].tolist()), atol=1e-3, rtol=0)
        for v in range(cfg.views):
            d = (va[v] - vb[v]).abs().mul(255).mean(dim=(1, 2, 3))
            enlarged = (wa[:, v, 2] < S) | (wa[:, v, 3] < S)
            up += d[enlarged].tolist()
            down += d[~enlarged].tolist()
    print(f"fused vs unfused, mean grey levels per view: enlarged crops {np.mean(up):.2f} (max {max(up):.2f}, "
          f"{len(up)} views), shrunk {np.mean(down):.2f} (max {max(down):.2f}, {len(down)} views)")
    assert len(up) > 20 and len(down) > 20
    assert np.mean(down) < 1.5 and max(down) < 4.0
    assert np.mean(up) < 1.5 and max(up) < 4.0


def test_stale_ffcv_dispatchers_are_collected_quietly(dataset: Path) -> None:
    """FFCV's own decoders' dispatchers, collected after a later Loader changed a numba type's hash, raise a
    KeyError in numba's finalizer: the backend drops that one case from stderr, and only it."""
    script = textwrap.dedent(f"""
        import gc, weakref
        from viewpipe.pipelines import LoaderConfig
        from viewpipe.augment import preset
        from viewpipe.pipelines.ffcv import FfcvLoader
        from viewpipe.pipelines.baselines import StockFfcvLoader
        cfg = LoaderConfig(batch_size=8, augment=preset("mocov2", size=8), workers=1, device="cpu")
        loader = StockFfcvLoader({str(dataset)!r}, cfg)
        next(iter(loader)); loader.close(); del loader
        FfcvLoader({str(dataset)!r}, cfg).close()
        gc.collect()
        class Other: pass
        o = Other(); weakref.finalize(o, lambda: 1 / 0); del o  # any other unraisable error still shows
        print("done")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr
    assert "ZeroDivisionError" in res.stderr
    assert "KeyError" not in res.stderr, res.stderr


def test_clear_errors(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ViewpipeError, match=r"not an FFCV dataset; convert it first \(viewpipe convert .* DST "):
        build(FfcvLoader, tmp_path, cfg_(), device="cpu")
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)
    with pytest.raises(ViewpipeError, match=r"FFCV is not installed.*viewpipe\[ffcv\]"):
        build(FfcvLoader, dataset, cfg_(), device="cpu")


def test_damaged_jpeg_bytes_are_replaced_and_named(dataset: Path, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture) -> None:
    """Random bytes in one sample's entropy-coded data (libjpeg-turbo decodes it with a warning: pixels
    incomplete): the sample is replaced by the next one for the rest of the run and named once on stderr, as
    in the DALI and reference backends; the batch that held it is decoded again without it."""
    from ffcv.libffcv import imdecode

    damaged = tmp_path / "ds"
    shutil.copytree(dataset, damaged)
    decoded, bad = Decoded(damaged), 21
    ptr, size = int(decoded.meta["data_ptr"][bad]), decoded.size[int(decoded.meta["data_ptr"][bad])]
    with open(damaged / BETON, "r+b") as f:  # the middle of the JPEG data, same length
        f.seek(ptr + size // 2)
        f.write(np.random.default_rng(0).integers(0, 256, 48, dtype=np.uint8).tobytes())
    data, H, W = Decoded(damaged).data(bad)
    assert imdecode(data, np.zeros((H, W, 3), np.uint8), H, W, H, W, 0, 0, 1, 1, False, False) != 0
    loader = build(FfcvLoader, damaged, cfg_(augment=PLAIN, drop_last=False), device="cpu")
    seen = [k for batch in loader for k in batch[2].tolist()]
    err = capfd.readouterr().err
    assert err.count("fails to decode") == 1 and f"sample {bad})" in err and f"replaced by sample {bad + 1}" in err
    assert list(loader.decode_failures) == [bad] and bad not in seen and seen.count(bad + 1) == 2
    assert len(seen) == 96 and loader.decodes[bad] == 0
