"""Multi-crop views (`LoaderConfig.groups`, `parse_views`): groups of views with their own count, size, scale
range and box use, delivered by every backend in group order from one decode per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build
from viewpipe.augment import preset
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError
from viewpipe.formats import DatasetIndex
from viewpipe.pipelines import LoaderConfig, ViewGroup, get_backend, parse_views
from viewpipe.state import SampleState
from viewpipe.convert import convert

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKENDS = ["torch", "dali", "ffcv"]
KW = {"torch": {}, "dali": {"device": "cpu"}, "ffcv": {"device": "cpu"}}


@pytest.fixture(scope="module")
def dataset(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("multicrop") / "ds"
    convert(image_folder, dst, formats=("dali", "ffcv"), workers=1, shard_size=32)
    return dst


def test_parse_views() -> None:
    assert parse_views("2x224,6x96@0.05-0.2") == (ViewGroup(2, 224, (0.2, 1.0)), ViewGroup(6, 96, (0.05, 0.2)))
    assert parse_views("2x224@0.08-1,4x96:nobox", scale=(0.3, 1.0)) == (
        ViewGroup(2, 224, (0.08, 1.0)), ViewGroup(4, 96, (0.05, 0.2), use_box=False))
    assert parse_views("3X32", scale=(0.5, 1.0)) == (ViewGroup(3, 32, (0.5, 1.0)),)
    for bad in ("2x", "x224", "2x224@0.5", "2x224:maybe", "2x224@0.5-2", "0x224"):
        with pytest.raises(ViewpipeError):
            parse_views(bad)
    cfg = LoaderConfig(views=2, groups=parse_views("2x224,6x96"))
    assert cfg.views == 8 and cfg.view_sizes() == [224] * 2 + [96] * 6 and cfg.group_of_views() == [0, 0] + [1] * 6
    assert cfg.group_augment(1).size == 96 and cfg.group_augment(1).kernel_size == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_sizes_scales_and_boxes(backend: str, dataset: Path, state_name: str) -> None:
    """Per backend: views in group order with each group's size; each group's windows within its scale range
    (area fraction, RandomResizedCrop's rounding aside); boxes steer only the groups that ask for them."""
    index = DatasetIndex.load(dataset)
    groups = (ViewGroup(2, 32, (0.3, 1.0)), ViewGroup(3, 16, (0.05, 0.15)), ViewGroup(2, 16, (0.05, 0.15), False))
    cfg = LoaderConfig(batch_size=16, groups=groups, crop=CropConfig(alpha=0.6), augment=preset("mocov2", size=32),
                       workers=1, seed=2)
    n = len(index)
    with SampleState.create(n, name=state_name) as st:
        st.set_boxes(np.tile(np.array([0.0, 0.0, 0.2, 0.2], np.float32), (n, 1)))  # top-left corner
        loader = build(get_backend(backend), dataset, cfg, st, **KW[backend])
        batches = list(loader)
    areas, centres = {g: [] for g in range(3)}, {g: [] for g in range(3)}
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 5
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batch.views)
        idx, win = batch.indices.numpy(), batch.windows.numpy()
        assert win.shape == (16, 7, 4)
        H, W = index.heights[idx][:, None], index.widths[idx][:, None]
        for g, cols in ((0, [0, 1]), (1, [2, 3, 4]), (2, [5, 6])):
            w = win[:, cols]
            areas[g] += (w[..., 2] * w[..., 3] / (H * W)).ravel().tolist()
            centres[g] += ((w[..., 0] + w[..., 2] / 2) / H).ravel().tolist()
    for g, (lo, hi) in ((0, (0.3, 1.0)), (1, (0.05, 0.15)), (2, (0.05, 0.15))):
        a = np.array(areas[g])
        assert np.mean((a >= lo * 0.8) & (a <= hi * 1.2)) > 0.95, (g, a.min(), a.max())
    assert np.mean(areas[1]) < 0.15 < np.mean(areas[0])
    # boxed local crops sit near the top edge (centre drawn inside the box), unboxed ones anywhere
    assert np.mean(centres[1]) < 0.3 and np.mean(centres[2]) > 0.4
    if backend == "ffcv":
        assert (loader.decodes[np.concatenate([b.indices.numpy() for b in batches])] == 1).all()  # one decode each
    getattr(loader, "close", lambda: None)()


def test_one_group_is_the_plain_loader(dataset: Path) -> None:
    """A single group equal to the defaults gives exactly the batches of `views` views of `augment.size`."""
    base = LoaderConfig(views=2, batch_size=16, augment=preset("mocov2", size=24), workers=1, seed=4)
    grouped = LoaderConfig(batch_size=16, augment=preset("mocov2", size=24), workers=1, seed=4,
                           groups=(ViewGroup(2, 24, base.crop.scale),))
    a, b = list(build(get_backend("dali"), dataset, base, device="cpu")), list(build(get_backend("dali"), dataset, grouped,
                                                                                               device="cpu"))
    for x, y in zip(a, b):
        assert torch.equal(x.windows, y.windows) and all(torch.equal(p, q) for p, q in zip(x.views, y.views))


def test_bench_reports_multicrop(image_folder: Path, tmp_path: Path) -> None:
    """`viewpipe bench --views 2x32,4x16@0.05-0.2`: every row counts 6 views per image."""
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"VIEWPIPE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "viewpipe.tools", "bench", "--data", str(image_folder), "--backend",
                          "dali", "--views", "2x32,4x16@0.05-0.2", "--batch-size", "8", "--batches", "1",
                          "--workers", "1", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["rows"]}
    assert rows["dali, 6 views, ContrastiveCrop boxes"]["views"] == 6
    assert any(name.startswith("stock DALI, 6 views") for name in rows)


def test_multicrop_recipe_trains(image_folder: Path, dataset: Path, tmp_path: Path) -> None:
    """The shipped multi-crop config loads and validates; the same recipe at a small scale trains MoCo v2 with
    the small views as extra queries (8 views per sample reach the method)."""
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "mocov2_multicrop_ccrop_imagenet.yaml", [])
    assert [(g.count, g.size, g.scale) for g in cfg.data.groups] == [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]
    cfg = load_config(repo / "configs" / "mocov2_multicrop_ccrop_imagenet.yaml", [
        f"data.path={dataset}", "data.backend=memory", "backbone=resnet_tiny", "data.size=32",
        "data.groups[0].size=32", "data.groups[1].size=16", "data.groups[1].count=3", "data.batch_size=16", "data.workers=1", "epochs=1",
        "max_steps=3", "method_args={queue: 64, hidden: 32}", f"out={tmp_path / 'run'}", "device=cpu"])
    t = Trainer(cfg)
    try:
        batch = next(iter(t.loader(0)))
        assert [v.shape[-1] for v in batch.views] == [32, 32, 16, 16, 16]
        loss, _ = t.train_step(batch, 0.03, 0.0)
        assert torch.isfinite(loss)
    finally:
        t.close()
    with pytest.raises(ViewpipeError, match="data.multicrop"):
        load_config(None, ["data.multicrop=2x"])
