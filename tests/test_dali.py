"""What only the DALI backend has, in DALI's CPU-only mode (`device="cpu"`): the ROI axis order against PIL
crops, any `Source` read file by file, decode failures found by re-decoding, its errors.
The loader contract every backend meets (shapes, windows, live updates, companions, ranks, order, resume) is
tests/test_backends.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: E402,F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build, documented_windows, plain_augment, same_batches  # noqa: E402
from conftest import loader_cfg as cfg_  # noqa: E402
from viewpipe.crop import CropConfig  # noqa: E402
from viewpipe.formats import DatasetIndex, open_image, shard_paths  # noqa: E402
from viewpipe.pipelines import DaliOptions, epoch_order  # noqa: E402
from viewpipe.pipelines.dali import DaliLoader  # noqa: E402
from viewpipe.sources import ShardSource  # noqa: E402

S = 32
PLAIN = plain_augment(S)
# Measured (DALI 2.4 CPU, generated JPEGs 40-96 px, S=32, 192 views): the decodes are identical; the
# resizes (DALI linear + antialias vs PIL BILINEAR with a box) differ by mean 0.16 grey levels, 99.9th
# percentile 1, max 10 (a few pixels); the same crops with the ROI read as (x, y) differ by 26 on average.
PIL_MEAN_DIFF = 0.5
PIL_P999_DIFF = 2.0
PIL_MAX_DIFF = 16.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(converted: Path) -> Path:
    return converted


def test_roi_axis_order_against_pil_crops(dataset: Path) -> None:
    """DALI's resize gets (y, x) ROIs: its crops match PIL crops of the same (top, left, h, w) windows (here
    without boxes: the uniform corner of plain RandomResizedCrop), not those of the windows read as (x, y)."""
    index = DatasetIndex.load(dataset)
    assert (index.heights != index.widths).sum() > 48  # mostly non-square images
    cfg = cfg_(augment=PLAIN, crop=CropConfig(use_box=False))
    loader = build(DaliLoader, dataset, cfg, device="cpu")
    loader.set_epoch(1)
    source = ShardSource(dataset)
    diffs, swapped, nonsquare = [], [], 0
    for b, (views, _, indices, _, windows) in enumerate(loader):
        idx = indices.numpy()
        full = np.tile([0.0, 0.0, 1.0, 1.0], (len(idx), 1))
        sizes = np.stack([index.heights[idx], index.widths[idx]], 1)
        np.testing.assert_array_equal(windows.numpy(), documented_windows(sizes, full, cfg,
                                                                          np.random.default_rng([cfg.seed, 1, 0, b])))
        for n, k in enumerate(idx.tolist()):
            img = open_image(source.read(k))
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


def test_missing_shards_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    from viewpipe.errors import ViewpipeError

    with pytest.raises(ViewpipeError, match="dataset index"):
        build(DaliLoader, tmp_path, cfg_(), device="cpu")


def test_missing_dali_is_a_clear_error(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from viewpipe.errors import ViewpipeError

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ViewpipeError, match=r"NVIDIA DALI is not installed.*viewpipe\[dali-cuda1[23]\]"):
        build(DaliLoader, dataset, cfg_(), device="cpu")


def test_a_source_gives_the_same_batches_as_its_shards(dataset: Path, image_folder: Path) -> None:
    """Over an image folder (read file by file, sizes from the headers) the loader matches the shards."""
    from viewpipe.sources import open_source

    cfg = cfg_(augment=PLAIN)
    a = list(build(DaliLoader, dataset, cfg, device="cpu"))
    b = list(build(DaliLoader, open_source(image_folder), cfg, device="cpu"))
    assert len(a) == len(b) == 12
    same_batches(a, b)


@pytest.mark.parametrize("ahead", [0, 2], ids=["in-callback", "plan-ahead-2"])
def test_a_sample_that_fails_to_decode_is_replaced_and_counted(dataset: Path, tmp_path: Path, ahead: int,
                                                              capfd: pytest.CaptureFixture) -> None:
    """A file damaged after conversion (its header overwritten) does not stop the epoch: the sample is
    replaced by the next one, reported once on stderr and in `decode_failures`, and remembered on resume.
    The copy's index has no per-sample checksums (as one written before them), which would find the damage
    before DALI's decoder does: here DALI's decode fails and the loader finds the sample by decoding again.
    The same with the batches planned by a thread (`plan_ahead`): those planned before the failure plan again."""
    import shutil

    from viewpipe.formats import INDEX

    index = DatasetIndex.load(dataset)
    damaged = tmp_path / "ds"
    shutil.copytree(dataset, damaged)
    with np.load(damaged / INDEX) as z:
        arrays = {k: z[k] for k in z.files if "checksum" not in k}
    np.savez(damaged / INDEX, **arrays)
    bad = int(epoch_order(len(index), 3, 0)[13])  # in batch 1
    tar, _ = shard_paths(damaged, int(index.shards[bad]))
    with open(tar, "r+b") as f:
        f.seek(int(index.offsets[bad]))
        f.write(b"\0" * 64)
    cfg = cfg_(augment=PLAIN, dali=DaliOptions(plan_ahead=ahead))
    good = list(build(DaliLoader, dataset, cfg, device="cpu"))
    loader = build(DaliLoader, damaged, cfg, device="cpu")
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
    again = build(DaliLoader, damaged, cfg, device="cpu")
    again.load_state_dict(sd | {"epoch": 0, "batch": 1})
    assert [idx.tolist() for _, _, idx, *_ in again] == [idx.tolist() for _, _, idx, *_ in got[1:]]
    assert "fails to decode" not in capfd.readouterr().err
