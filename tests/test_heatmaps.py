"""Heatmaps as the shared state: boxes derived from them bit for bit as `boxes_from_heatmaps`, the live
threshold (set by the owner or from outside, `viewpipe state set-threshold`) reaching a running loader within
its `prefetch` bound, the heatmap-guided centre sampler's statistics, and a resumed run keeping heatmaps and
threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build, documented_windows, loader_cfg, plain_augment, run_python
from viewpipe.crop import FULL_BOX, CropConfig, draw, heatmap_windows, view_windows, windows_from_draws
from viewpipe.errors import ViewpipeError
from viewpipe.heatmap_boxes import LiveBoxes, derive_boxes, exact_boxes
from viewpipe.pipelines import ViewGroup, get_backend, parse_views
from viewpipe.pipelines.plan import Planner, Substitutes
from viewpipe.state import SampleState, sanitize_boxes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maps(rng: np.random.Generator, kind: int, b: int, k: int) -> np.ndarray:
    """b uint8 k×k heatmaps of one kind: uniform noise, sparse, few levels (plateaus), constant, smooth blobs."""
    if kind == 0:
        return rng.integers(0, 256, (b, k, k)).astype(np.uint8)
    if kind == 1:
        return ((rng.random((b, k, k)) < 0.3) * rng.integers(0, 256, (b, k, k))).astype(np.uint8)
    if kind == 2:
        return (rng.integers(0, 4, (b, k, k)) * 85).astype(np.uint8)
    if kind == 3:
        return np.broadcast_to(rng.integers(0, 256, (b, 1, 1)), (b, k, k)).astype(np.uint8)
    g = np.arange(k)
    c = rng.uniform(0, k - 1, (b, 2, 1))
    m = np.exp(-((g - c[:, :1]) ** 2)[:, 0, :, None] / 2 - ((g - c[:, 1:]) ** 2)[:, 0, None, :] / 2)
    return np.rint((m - m.min((1, 2), keepdims=True)) / np.ptp(m, (1, 2), keepdims=True).clip(1e-12) * 255).astype(
        np.uint8)


def _table(heat: np.ndarray, size: tuple[int, int], t: float) -> np.ndarray:
    """The boxes table the heatmaps give: `boxes_from_heatmaps`' boxes, invalid ones the full image."""
    return sanitize_boxes(exact_boxes(heat, size, t))[0]


def test_derived_boxes_equal_boxes_from_heatmaps_bit_for_bit() -> None:
    """Random heatmaps (noise, sparse, plateaus, constant, all zero, blobs), K 1..8, sizes 1..300 square and
    not, thresholds random, exact k/255 levels (in float64 and float32), 0, 0.1, 1 and outside [0, 1]."""
    rng = np.random.default_rng(0)
    for trial in range(180):
        k = int(rng.integers(1, 9))
        h = int(rng.integers(1, 301))
        w = h if trial % 3 == 0 else int(rng.integers(1, 301))
        hm = _maps(rng, trial % 5, 12, k)
        hm[0] = 0  # an all-zero map: the full box (at t >= 0)
        level = int(rng.integers(0, 256)) / 255
        t = [rng.random(), level, float(np.float32(level)), 0.1, 0.0, 1.0, -0.5, 1.5][trial % 8]
        got, want = derive_boxes(hm, (h, w), t), exact_boxes(hm, (h, w), t)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), want.view(np.int32)), (k, h, w, t)
        if t >= 0:
            np.testing.assert_array_equal(got[0], FULL_BOX)


def test_box_edges_divide_as_torch_does() -> None:
    """Every edge r / H the derivation writes (float32 division) is torch's int64 / int true division."""
    for n in range(1, 301):
        r = np.arange(n)
        want = (torch.arange(n) / n).float().numpy()
        assert np.array_equal((r.astype(np.float32) / np.float32(n)).view(np.int32), want.view(np.int32)), n


def test_derive_rejects_bad_shapes() -> None:
    with pytest.raises(ViewpipeError, match="heatmaps must be"):
        derive_boxes(np.zeros((2, 3, 4), np.uint8), (8, 8), 0.1)


def test_live_boxes_follow_table_heatmaps_and_threshold(state_name: str) -> None:
    """Without published heatmaps the boxes table; with them the derived boxes, re-derived when the heatmaps,
    the threshold (the owner's or another process's store) or the input size change."""
    rng = np.random.default_rng(1)
    heat = _maps(rng, 4, 30, 5)
    with SampleState.create(30, name=state_name, heatmap_size=5) as st:
        live = LiveBoxes(st)
        table = np.tile(np.array([0.1, 0.1, 0.6, 0.6], np.float32), (30, 1))
        st.set_boxes(table)
        idx = np.array([3, 3, 7, 29])
        np.testing.assert_array_equal(live.boxes(idx), table[idx])
        assert st.threshold == 0.1 and st.input_size is None and not live.derived()
        st.set_heatmaps(heat, input_size=(40, 24))
        assert live.derived() and st.input_size == (40, 24)
        np.testing.assert_array_equal(live.boxes(idx), _table(heat[idx], (40, 24), 0.1))
        st.set_threshold(0.6)
        np.testing.assert_array_equal(live.boxes(idx), _table(heat[idx], (40, 24), 0.6))
        out = run_python(f"from viewpipe.state import SampleState; print(SampleState.set_threshold_of({state_name!r}, "
                         "0.35))")
        assert out.returncode == 0 and out.stdout.strip() == "0.6", out.stderr
        assert st.threshold == 0.35
        np.testing.assert_array_equal(live.boxes(idx), _table(heat[idx], (40, 24), 0.35))
        st.set_heatmaps(heat[::-1].copy(), input_size=(16, 16))
        np.testing.assert_array_equal(live.boxes(idx), _table(heat[::-1][idx], (16, 16), 0.35))
        for bad in (float("nan"), "x"):
            with pytest.raises(ViewpipeError, match="threshold must be"):
                st.set_threshold(bad)
    with SampleState.create(4, name=state_name + "-nh") as st:
        with pytest.raises(ViewpipeError, match="no heatmaps table"):
            SampleState.set_threshold_of(st.name, 0.2)
    with pytest.raises(ViewpipeError, match="no sample state named"):
        SampleState.set_threshold_of(state_name + "-missing", 0.2)


def test_live_boxes_read_the_pass_table_while_its_key_holds(state_name: str) -> None:
    """The box pass's table (`set_derived_boxes`) is read as it is while heatmaps, threshold and input size are
    those it was derived at; after a threshold change or a plain `set_boxes` the boxes are derived, equal to
    what the table would hold (degenerate boxes, one row high, the full image as `sanitize_boxes` makes them)."""
    heat = _maps(np.random.default_rng(6), 4, 20, 4)
    heat[0] = 0
    heat[0, 0, 2] = 255  # one hot cell at a 4 px input: a box one row high, invalid in the table
    with SampleState.create(20, name=state_name, heatmap_size=4, threshold=0.3) as st:
        live, idx = LiveBoxes(st), np.arange(20)
        st.set_heatmaps(heat, input_size=(4, 4))
        assert exact_boxes(heat[:1], (4, 4), 0.3)[0, 0] == exact_boxes(heat[:1], (4, 4), 0.3)[0, 2]  # h1 == h0
        marked = exact_boxes(heat, (4, 4), 0.3)
        marked[5] = (0.25, 0.25, 0.5, 0.5)  # a row the derivation would not give: shows the table is read
        st.set_derived_boxes(marked, 0.3)
        assert st.boxes_key() == st.heatmap_key()
        np.testing.assert_array_equal(live.boxes(idx), st.boxes())
        want = sanitize_boxes(exact_boxes(heat, (4, 4), 0.3))[0]
        np.testing.assert_array_equal(want[0], FULL_BOX)
        st.set_boxes(st.boxes())  # a plain table: no longer the heatmaps'
        assert st.boxes_key() is None
        np.testing.assert_array_equal(live.boxes(idx), want)
        st.set_derived_boxes(want, 0.3)
        st.set_threshold(0.5)
        np.testing.assert_array_equal(live.boxes(idx), sanitize_boxes(exact_boxes(heat, (4, 4), 0.5))[0])


def test_state_dict_and_files_keep_heatmaps_threshold_and_size(tmp_path: Path, state_name: str) -> None:
    heat = _maps(np.random.default_rng(2), 0, 10, 4)
    with SampleState.create(10, name=state_name, heatmap_size=4) as st:
        st.set_heatmaps(heat, input_size=(32, 48))
        st.set_derived_boxes(_table(heat, (32, 48), 0.1), 0.1)
        st.set_threshold(0.42)
        st.save(tmp_path / "s.npz")
        sd = st.state_dict()
        assert np.isnan(sd["boxes_threshold"])  # the table is not the boxes at 0.42
        st.set_derived_boxes(_table(heat, (32, 48), 0.42), 0.42)
        derived = st.state_dict()
        assert derived["boxes_threshold"] == 0.42
    for load in (lambda s: s.load_state_dict(sd), lambda s: s.load(tmp_path / "s.npz")):
        with SampleState.create(10, name=state_name + "-b", heatmap_size=4) as st2:
            load(st2)
            assert (st2.threshold, st2.input_size) == (0.42, (32, 48))
            np.testing.assert_array_equal(st2.heatmaps(), heat)
            np.testing.assert_array_equal(LiveBoxes(st2).boxes(np.arange(10)), _table(heat, (32, 48), 0.42))
            assert st2.boxes_key() is None  # derived by the loaders (the saved table was of 0.1)
    with SampleState.create(10, name=state_name + "-e", heatmap_size=4) as st4:
        st4.load_state_dict(derived)
        assert st4.boxes_key() == st4.heatmap_key()  # the table is read as it is after a resume
    with SampleState.create(10, name=state_name + "-c", heatmap_size=4) as st3:  # never published: stays so
        st3.load_state_dict(SampleState.create(10, name=state_name + "-d", heatmap_size=4).state_dict())
        assert st3.heatmap_key() is None


@pytest.mark.parametrize("workers", [0, 2])
def test_threshold_set_from_the_command_reaches_a_running_loader(image_folder: Path, state_name: str, workers: int,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """`viewpipe state set-threshold NAME T` after batch u: every batch from u + prefetch on is planned with the
    boxes derived at T, those up to u with the old ones (the reference backend, without and with DataLoader
    workers: bounds 1 and 5)."""
    from viewpipe.tools.cli import main

    n = 96
    heat = np.zeros((n, 4, 4), np.uint8)
    heat[:, 0, 0], heat[:, 0, 1], heat[:, 3, 3] = 255, 120, 40
    cfg = loader_cfg(augment=plain_augment(), crop=CropConfig(alpha=0.6), workers=workers, shuffle=False)
    with SampleState.create(n, name=state_name, heatmap_size=4, threshold=0.6) as st:
        st.set_heatmaps(heat, input_size=(32, 32))
        old, new = _table(heat, (32, 32), 0.6), _table(heat, (32, 32), 0.1)
        assert not np.array_equal(old, new)
        loader = build(get_backend("torch"), image_folder, cfg, st, overlap=False)
        update_after, seen = 2, []
        for b, batch in enumerate(loader):
            i = batch.indices.numpy()
            sizes = loader.planner.sizes(i)
            got = batch.windows.numpy()
            rng = lambda: np.random.default_rng([cfg.seed, 0, 0, b])  # noqa: E731
            is_old = np.array_equal(got, documented_windows(sizes, old[i], cfg, rng()))
            is_new = np.array_equal(got, documented_windows(sizes, new[i], cfg, rng()))
            assert is_old != is_new, b
            seen.append("old" if is_old else "new")
            if b == update_after:
                assert main(["state", "set-threshold", state_name, "0.1"]) == 0
        assert "threshold 0.6 -> 0.1" in capsys.readouterr().out
        p = loader.prefetch
        assert p == (1 if workers == 0 else 5) and len(seen) > update_after + p
        assert seen[: update_after + 1] == ["old"] * (update_after + 1)
        assert seen[update_after + p :] == ["new"] * (len(seen) - update_after - p), (seen, p)
        assert main(["state", "show", state_name]) == 0
        shown = capsys.readouterr().out
        assert "threshold 0.1" in shown and "32x32" in shown and "heatmaps: 96 x 4 x 4" in shown
    assert main(["state", "set-threshold", state_name, "x"]) == 2


def test_guided_centres_follow_the_heatmap_mass() -> None:
    """Centres fall in the hot cells in proportion to their mass (chi-square, fixed seed); inside a cell they
    follow Beta(α, α) (α < 1: more near the cell's edges than in its middle); an all-zero map gets the box
    sampler's full-box windows from the same draws."""
    k, side, b, views = 4, 200, 2000, 2
    heat = np.zeros((b, k, k), np.uint8)
    heat[:, 1, 1], heat[:, 2, 2] = 150, 50  # masses 3 : 1
    heat[-1] = 0
    sizes = np.tile([side, side], (b, 1))
    cfg = CropConfig(alpha=0.6, scale=(0.01, 0.02))
    win = heatmap_windows(np.random.default_rng(5), sizes, heat, views, cfg)
    assert win.shape == (b, views, 4) and win.dtype == np.int32
    hot = win[:-1].reshape(-1, 4)
    cy, cx = hot[:, 0] + hot[:, 2] // 2, hot[:, 1] + hot[:, 3] // 2
    cell = (cy // (side // k)) * k + cx // (side // k)
    counts = np.bincount(cell, minlength=k * k)
    assert counts.sum() == counts[5] + counts[10]  # every centre in a hot cell
    expected = np.array([0.75, 0.25]) * len(hot)
    chi2 = (((counts[[5, 10]] - expected) ** 2) / expected).sum()
    assert chi2 < 10.83  # p = 0.001 at one degree of freedom
    frac = (cy % (side // k)) / (side // k)
    edges, middle = ((frac < 0.25) | (frac >= 0.75)).mean(), ((frac >= 0.25) & (frac < 0.75)).mean()
    assert edges > middle + 0.1  # Beta(0.6, 0.6): about 0.60 vs 0.40
    rng = np.random.default_rng(5)
    d = draw(rng, views * b, cfg)
    full = windows_from_draws(np.tile(sizes, (views, 1)), np.tile(FULL_BOX, (views * b, 1)), d, cfg)
    np.testing.assert_array_equal(win[-1], full.reshape(views, b, 4)[:, -1])


def test_planner_dispatches_heatmap_groups(state_name: str) -> None:
    """A `:heatmap` group draws from the live heatmaps once published and from the boxes before; a plain group
    keeps ContrastiveCrop's sampler on the derived boxes; the config refuses unknown centres."""
    assert [g.centres for g in parse_views("2x32,2x16:heatmap")] == ["box", "heatmap"]
    with pytest.raises(ViewpipeError, match="centres must be one of"):
        ViewGroup(centres="middle")
    with pytest.raises(ViewpipeError, match="cannot read view group"):
        parse_views("2x32:hot")
    n, groups = 40, parse_views("2x32,2x16:heatmap")
    cfg = loader_cfg(groups=groups, crop=CropConfig(alpha=0.6))
    sizes = np.random.default_rng(3).integers(20, 90, (n, 2))
    heat = _maps(np.random.default_rng(4), 4, n, 4)
    with SampleState.create(n, name=state_name, heatmap_size=4) as st:
        planner = Planner(cfg, 0, st, Substitutes(n, str), lambda i: sizes[i])
        idx = np.arange(8, 16)

        def expect(boxes: np.ndarray, guided: bool) -> np.ndarray:
            rng = np.random.default_rng([cfg.seed, 1, 0, 2])
            a = view_windows(rng, sizes[idx], boxes, 2, cfg.group_crop(0))
            g = (heatmap_windows(rng, sizes[idx], heat[idx], 2, cfg.group_crop(1)) if guided else
                 view_windows(rng, sizes[idx], boxes, 2, cfg.group_crop(1)))
            return np.concatenate([a, g], 1)

        np.testing.assert_array_equal(planner.plan(1, 2, idx).windows, expect(st.boxes(idx), False))
        st.set_heatmaps(heat, input_size=(32, 32))
        np.testing.assert_array_equal(planner.plan(1, 2, idx).windows, expect(_table(heat[idx], (32, 32), 0.1), True))


def test_a_resumed_run_keeps_heatmaps_and_threshold(image_folder: Path, tmp_path: Path) -> None:
    """The box update publishes K×K uint8 heatmaps (K from the backbone) with the input size and the boxes
    derived from them; a threshold changed afterwards is in the checkpoint, and a resume restores all three."""
    from viewpipe.trainers.ccrop import heatmap_side
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    cfg = load_config(None, [f"data.path={image_folder}", "data.backend=torch", "backbone=resnet_tiny", "epochs=3",
                             "data.batch_size=16", "data.workers=0", "data.size=24", "method_args={queue: 256}",
                             "ccrop.enabled=true", "ccrop.warmup=0", "ccrop.interval=1", "ccrop.grid=0",
                             f"out={tmp_path}", "device=cpu", "channels_last=false", "knn_every=0"])
    trainer = Trainer(cfg)
    try:
        st = trainer.state
        k = heatmap_side(trainer.method.backbone, 24)
        assert st.layout.heatmap_size == k and st.threshold == cfg.ccrop.threshold and st.heatmap_key() is None
        trainer.boxes.run(trainer.method, trainer.data, 0)
        heat = st.heatmaps()
        assert st.input_size == (24, 24) and heat.any()
        np.testing.assert_array_equal(st.boxes(), _table(heat, (24, 24), cfg.ccrop.threshold))
        assert st.boxes_key() == st.heatmap_key()  # the loaders read the pass's table until the threshold changes
        st.set_threshold(0.45)
        trainer.save({"epoch": 1, "batch": 0})
    finally:
        trainer.close()
    resumed = Trainer(cfg, resume="auto")
    try:
        st = resumed.state
        assert (st.threshold, st.input_size) == (0.45, (24, 24))
        np.testing.assert_array_equal(st.heatmaps(), heat)
        np.testing.assert_array_equal(LiveBoxes(st).boxes(np.arange(len(st))), _table(heat, (24, 24), 0.45))
    finally:
        resumed.close()


def test_state_bench_measures_a_small_state() -> None:
    """`viewpipe state bench`'s measurement (its figures at ImageNet's scale are in docs/loaders.md): every step
    timed, the reader process derives every box."""
    from viewpipe.tools.statecmd import bench

    r = bench(3000, 4, 3, 32)
    assert r["n"] == 3000 and r["reader"]["derive_all_s"] > 0 and r["segment_mb"] > 0
    assert {"create_s", "publish_heatmaps_s", "publish_neighbours_s", "set_threshold_of_s"} <= set(r)
    with pytest.raises(ViewpipeError, match="must be >= 1"):
        bench(0, 4, 3, 32)
