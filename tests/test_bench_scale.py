"""`viewpipe bench --scale` and `--soak` at tiny sizes: what each reports (its keys, its counts), the growth
exponents and the soak's slopes and growth flags on series made to grow or stay flat. Speed is never judged
here; the figures at ImageNet scale are in docs/bench.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from viewpipe.state import SampleState
from viewpipe.tools import bench_scale, bench_soak
from viewpipe.tools.cli import build_parser


def test_scale_run_reports_the_index_state_and_a_planned_epoch() -> None:
    """At 4096 samples: an index of that many entries, the state's segment sized for its three double-buffered
    tables, every rank's batches of 256 planned (4096 // 8 // 256 = 2 each), the other process's attach."""
    r = bench_scale.scale_run(4096, progress=False)
    assert r["n"] == 4096 and r["batches_planned"] == 8 * 2
    assert r["index_mb"] > 0 and r["index_in_memory_mb"] > 0
    tables = 4096 * (4 * 4 + 7 * 7 + 5 * 4)  # boxes float32 ×4, 7×7 uint8 heatmaps, 5 int32 neighbours
    assert 2 * tables / 2**20 <= r["shm_mb"] <= (2 * tables + 4096 + 6 * 64) / 2**20
    for key in ("state_create_s", "state_attach_s", "other_process_attach_s", "publish_boxes_s",
                "publish_heatmaps_s", "publish_neighbours_s", "plan_epoch_s", "plan_per_batch_ms", "rss_mb"):
        assert r[key] >= 0, key


def test_synthetic_index_is_shaped_as_a_converted_imagenet() -> None:
    index = bench_scale.synthetic_index(25_000)
    assert len(index) == 25_000 and len(index.classes) == 1000
    assert index.shards.max() == 2 and (np.bincount(index.shards) == [10_000, 10_000, 5_000]).all()
    assert (np.diff(index.offsets[:10_000]) > index.nbytes[:9_999]).all()  # images do not overlap in a shard
    assert index.sources[0].startswith(b"/data/imagenet/train/n") and index.sources[0].endswith(b".JPEG")


def test_growth_and_the_fitted_exponent() -> None:
    small, big = {"n": 10, "a_s": 1.0, "b_ms": 2.0, "c_mb": 5.0}, {"n": 80, "a_s": 8.0, "b_ms": 2.0, "c_mb": 40.0}
    assert bench_scale.growth(small, big) == pytest.approx({"a_s": 1.0, "b_ms": 0.0})
    assert bench_scale.fit_exponent([1, 2, 4], [3.0, 12.0, 48.0]) == pytest.approx(2.0)


def test_folder_run_lists_and_probes_every_file(tmp_path: Path) -> None:
    """Trees of 60 and 120 files: every file listed and probed (none skipped), a fitted exponent per stage, the
    extrapolation to ImageNet; the trees are removed after."""
    r = bench_scale.folder_run(120, workers=1, sizes=(0.5, 1.0), progress=False, where=str(tmp_path))
    assert [row["files"] for row in r["rows"]] == [60, 120]
    assert set(r["exponent"]) == set(r["imagenet_s"]) == set(bench_scale.STAGES)
    assert all(row[f"{s}_cpu_s"] >= 0 for row in r["rows"] for s in bench_scale.STAGES)
    assert not list(tmp_path.iterdir())


def test_bench_scale_command_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = tmp_path / "scale.json"
    args = build_parser().parse_args(["bench", "--scale", "--scale-samples", "16384", "--scale-files", "40",
                                      "--workers", "1", "--report", str(report)])
    assert args.func(args) == 0
    out = json.loads(report.read_text())
    assert out["small"]["n"] == 2048 and out["big"]["n"] == 16384
    assert "plan_per_batch_ms" in out["exponent"] and len(out["folder"]["rows"]) == 3
    printed = capsys.readouterr().out
    assert "per batch planned (256) (ms)" in printed and "→1,281,167" in printed and "machine:" in printed


def test_scale_refuses_too_few_samples() -> None:
    from viewpipe.errors import ViewpipeError

    args = build_parser().parse_args(["bench", "--scale", "--scale-samples", "1000"])
    with pytest.raises(ViewpipeError, match="at least 16384"):
        args.func(args)


def test_soak_sample_counts_this_process_segments_and_mappings() -> None:
    before = bench_soak.sample()
    with SampleState.create(64, heatmap_size=4, neighbours=2):
        during = bench_soak.sample()
    after = bench_soak.sample()
    assert during["segments"] == before["segments"] + 1 and during["mapped_segments"] == before["mapped_segments"] + 1
    assert during["fds"] > before["fds"] and during["segment_mb"] > before["segment_mb"]
    assert (after["segments"], after["mapped_segments"], after["fds"]) == (before["segments"],
                                                                        before["mapped_segments"], before["fds"])


def test_soak_slopes_flag_what_grows_after_the_warm_up() -> None:
    """A descriptor leaked every epoch and memory rising 2 MB an epoch are flagged; a warm-up rise, noise in
    memory and flat counts are not."""
    flat = {"rss_mb": 100.0, "fds": 10, "threads": 4, "children": 0, "segments": 1, "mapped_segments": 1,
            "segment_mb": 0.3}
    rng = np.random.default_rng(0)
    calm = [flat | {"rss_mb": 100 + float(rng.normal(0, 0.2)), "threads": 4 + (e < 2)} for e in range(20)]
    slope = bench_soak.slopes(calm, 2)
    assert abs(slope["rss_mb"]) < bench_soak.RSS_MB_PER_EPOCH and slope["fds"] == pytest.approx(0)
    assert bench_soak.growing(calm, 2, slope) == []
    leaky = [flat | {"rss_mb": 100.0 + 2 * e, "fds": 10 + e} for e in range(20)]
    slope = bench_soak.slopes(leaky, 2)
    assert slope["fds"] == pytest.approx(1.0) and slope["rss_mb"] == pytest.approx(2.0)
    assert bench_soak.growing(leaky, 2, slope) == ["fds", "rss_mb"]


def test_soak_refuses_too_few_epochs() -> None:
    from viewpipe.errors import ViewpipeError

    args = build_parser().parse_args(["bench", "--soak", "--soak-epochs", "2"])
    with pytest.raises(ViewpipeError, match="at least 4"):
        args.func(args)
