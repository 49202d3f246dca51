"""The reference loader: views, labels, windows from the live SampleState with persistent workers."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from viewpipe.augment import preset
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import LoaderConfig, get_backend
from viewpipe.pipelines.reference import ReferenceDataset, decode_rgb, reference_loader
from viewpipe.sources import FolderSource
from viewpipe.state import SampleState


def _cfg(**kw) -> LoaderConfig:
    base = LoaderConfig(views=2, batch_size=8, augment=preset("mocov2", size=32), workers=0, seed=0)
    return replace(base, **kw)


def test_batches_have_views_labels_indices(image_folder) -> None:
    src = FolderSource(image_folder)
    loader = get_backend("torch")(src, _cfg(views=3, augment=preset("byol", size=24)))
    views, labels, idx = next(iter(loader))
    assert len(views) == 3
    for v in views:
        assert v.shape == (8, 3, 24, 24) and v.dtype == torch.float32
    assert labels.dtype == torch.int64 and idx.shape == (8,)
    np.testing.assert_array_equal(labels.numpy(), src.labels[idx.numpy()])
    assert len(loader) == len(src) // 8


def test_windows_follow_the_box(image_folder, state_name: str) -> None:
    src = FolderSource(image_folder)
    crop = CropConfig(alpha=0.5, scale=(0.05, 0.1))
    with SampleState.create(len(src), name=state_name) as st:
        st.set_boxes(np.tile(np.array([0.5, 0.5, 0.9, 0.9], np.float32), (len(src), 1)))
        ds = ReferenceDataset(src, _cfg(crop=crop), st, return_windows=True)
        for i in range(len(src)):
            *_, idx, win = ds[i]
            H, W = decode_rgb(src.read(i), "").size[::-1]
            for top, left, h, w in win.tolist():
                assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
                # the centre is constrained to the clamped box range
                assert top >= min(max(int(H * 0.5) - h // 2, 0), H - h)
                assert left >= min(max(int(W * 0.5) - w // 2, 0), W - w)


def test_box_update_reaches_persistent_workers(image_folder, state_name: str) -> None:
    """Boxes change mid-run; persistent workers use them for every sample decoded after the update.
    Bound: only batches already prefetched (workers × prefetch_factor = 4 here) predate it."""
    src = FolderSource(image_folder)
    cfg = _cfg(workers=2, crop=CropConfig(alpha=1.0, scale=(0.02, 0.03)), batch_size=4)
    with SampleState.create(len(src), name=state_name) as st:
        loader = reference_loader(src, cfg, st, return_windows=True)
        assert loader.persistent_workers
        it = iter(loader)
        first = [next(it) for _ in range(3)]
        # before: full-image boxes put some crops in the lower right half
        tops = np.concatenate([b[3][:, :, 0].numpy().ravel() for b in first])
        assert tops.max() > 20
        st.set_boxes(np.tile(np.array([0.0, 0.0, 0.05, 0.05], np.float32), (len(src), 1)))
        after = [next(it) for _ in range(2 * 2 + 4)][4:]  # skip the prefetched batches
        for _, _, idx, win in after:
            for i, sample in zip(idx.tolist(), win.numpy()):
                H, W = decode_rgb(src.read(i), "").size[::-1]
                for top, left, h, w in sample:
                    assert top <= max(int(H * 0.05) - h // 2, 0), (top, H, h)
                    assert left <= max(int(W * 0.05) - w // 2, 0), (left, W, w)
        # the next epoch too, without re-creating the workers
        _, _, idx, win = next(iter(loader))
        assert (win[:, :, 0] <= 2).all()


def test_state_size_mismatch_is_an_error(image_folder, state_name: str) -> None:
    src = FolderSource(image_folder)
    with SampleState.create(3, name=state_name) as st:
        with pytest.raises(ViewpipeError, match="has 3 rows but the data has"):
            ReferenceDataset(src, _cfg(), st)


def test_decode_rgb_converts_and_reports(tmp_path) -> None:
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
