"""`viewpipe bench`'s breakdown rows (DALI without photometric ops, the augmenter alone, the stock DALI
pipeline and each row's ratio to it), the loaders only bench times (viewpipe.pipelines.baselines: the stock DALI
and FFCV baselines, the DALI and FFCV decode ceilings, DALI's views before the photometric step; the production
backends carry none of them), benching FFCV on an FFCV-only conversion, and `hw_decoder_load` from the command
line and the config to the DALI loader."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build, loader_cfg, plain_augment
from viewpipe.augment import preset
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import LoaderConfig

VIEWPIPE = [sys.executable, "-m", "viewpipe.tools"]
STOCK = "stock DALI, 2 views (RRC + DALI colour ops)"
EXPERT = "stock DALI, 2 views, expert (conditionals, fp16)"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's cache (generated images, converted copies) in a temporary folder, not the user's."""
    monkeypatch.setenv("VIEWPIPE_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def viewpipe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*VIEWPIPE, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: "), res.stderr
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture(scope="module")
def converted(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The image folder converted three ways: DALI shards only, FFCV only, both."""
    from viewpipe.convert import convert

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, formats in (("dali", ("dali",)), ("ffcv", ("ffcv",))):
        convert(image_folder, root / name, formats=formats, workers=1)
        out[name] = root / name
    return out


# ------------------------------------------------------------------------------------ the stock DALI baseline
@pytest.mark.parametrize("name", ["mocov2", "byol", "mocov2_small"])
def test_stock_dali_baseline_batches_on_the_cpu(converted: dict[str, Path], name: str) -> None:
    """DALI's CPU mode: one epoch of full batches, V normalised float views (B, 3, S, S) and int64 labels of
    the dataset (every preset's ops build: blur, solarize, no blur)."""
    from viewpipe.formats import DatasetIndex
    from viewpipe.pipelines.baselines import StockDaliLoader

    cfg = LoaderConfig(views=2, batch_size=8, augment=preset(name, size=32), workers=1)
    loader = build(StockDaliLoader, converted["dali"], cfg, hw_decoder_load=0.3)
    assert loader.device_id is None and loader.hw_decoder_load == 0.3
    batches = list(loader)
    assert len(batches) == 96 // 8
    labels = set(DatasetIndex.load(converted["dali"]).labels.tolist())
    for views, lab, indices, *_ in batches:
        assert len(views) == 2 and indices.shape == (8,) and set(indices.tolist()) <= set(range(96))
        for v in views:
            assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 and v.device.type == "cpu"
            assert torch.isfinite(v).all() and -2.5 < v.mean() < 2.5 and 0.1 < v.std() < 3
        assert lab.dtype == torch.int64 and lab.shape == (8,) and set(lab.tolist()) <= labels
    assert not torch.equal(batches[0][0][0], batches[0][0][1])  # two different views
    assert len(list(loader)) == 12  # a second epoch from the same pipeline
    loader.close()


def test_stock_dali_baseline_gives_each_group_its_own_size_and_augmentation(converted: dict[str, Path]) -> None:
    """Multi-crop: each view of the stock graph has its group's size and its group's augmentation (here the
    small views normalised by their own mean 0 and std 100/255, so they stay in [0, 2.55])."""
    from dataclasses import replace

    from viewpipe.pipelines import ViewGroup
    from viewpipe.pipelines.baselines import StockDaliLoader

    small = replace(preset("mocov2", size=16), mean=(0.0, 0.0, 0.0), std=(100 / 255,) * 3)
    groups = (ViewGroup(2, 32, (0.2, 1.0)), ViewGroup(3, 16, (0.05, 0.2), ratio=(1.0, 1.0), augment=small))
    cfg = LoaderConfig(views=5, batch_size=8, augment=preset("mocov2", size=32), groups=groups, workers=1)
    loader = build(StockDaliLoader, converted["dali"], cfg)
    views = next(iter(loader)).views
    loader.close()
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    assert all(v.min() < -0.5 for v in views[:2])  # ImageNet's normalisation
    assert all(0 <= v.min() and v.max() <= 2.55 + 1e-4 for v in views[2:])


def test_stock_dali_baseline_needs_shards(converted: dict[str, Path]) -> None:
    from viewpipe.pipelines.baselines import StockDaliLoader

    with pytest.raises(ViewpipeError, match="no DALI shards"):
        build(StockDaliLoader, converted["ffcv"], LoaderConfig(batch_size=8))


# ------------------------------------------------------------------------------------ the other baselines
def test_production_backends_carry_no_benchmark_modes() -> None:
    """The decode-only, views-as-cut and stock loaders live in viewpipe.pipelines.baselines alone."""
    import inspect

    from viewpipe.pipelines import dali, ffcv, reference

    assert not {"decode_only", "photometric"} & set(inspect.signature(dali.DaliLoader).parameters)
    assert not {"decode_only", "stock"} & set(inspect.signature(ffcv.FfcvLoader).parameters)
    assert not hasattr(reference, "PilDecodeLoader") and not hasattr(ffcv, "StockFfcvLoader")


def test_bench_knows_every_backend(image_folder: Path) -> None:
    """`--backend` takes the registered backends (`viewpipe.pipelines.backends()`); another name is one line
    listing them."""
    from viewpipe.pipelines import BACKENDS, backends

    assert list(backends()) == sorted(BACKENDS) == ["dali", "ffcv", "memory", "torch"]
    one_line_error(viewpipe("bench", "--data", str(image_folder), "--backend", "nosuch"), "unknown backend 'nosuch'",
                   "available: dali, ffcv, memory, torch")


def test_pil_decode_only_reads_the_reference_loaders_batches(image_folder: Path) -> None:
    """The PIL ceiling: the reference loader's batches and order, decoded and nothing else."""
    from viewpipe.pipelines.baselines import PilDecodeLoader
    from viewpipe.pipelines.reference import ReferenceLoader

    cfg = loader_cfg(workers=0, drop_last=False, batch_size=10)
    expected = [b.indices.tolist() for b in ReferenceLoader(image_folder, cfg)]
    with PilDecodeLoader(image_folder, cfg) as loader:
        only = list(loader)
    assert [b.indices.tolist() for b in only] == expected and all(b.views is None for b in only)
    assert sorted(i for b in expected for i in b) == list(range(len(ReferenceLoader(image_folder, cfg).source)))


def test_dali_decode_only_reads_every_sample_of_the_epoch(converted: dict[str, Path]) -> None:
    """The decode ceiling `viewpipe bench` reports: the same batches as the DALI loader, decoded and nothing else."""
    from viewpipe.pipelines.baselines import DaliDecodeLoader
    from viewpipe.pipelines.dali import DaliLoader

    cfg = loader_cfg(drop_last=False)
    plain = [idx.tolist() for _, _, idx, *_ in build(DaliLoader, converted["dali"], cfg, device="cpu")]
    only = list(build(DaliDecodeLoader, converted["dali"], cfg, device="cpu"))
    assert [idx.tolist() for _, _, idx, *_ in only] == plain and all(v is None for v, *_ in only)


def test_dali_cut_loader_gives_the_views_before_the_photometric_step(converted: dict[str, Path]) -> None:
    """bench's "no photometric ops" row: the DALI loader's own views (same batches and windows) as uint8
    (B, S, S, 3), which the photometric step (here plain: only / 255) turns into the loader's views."""
    from viewpipe.pipelines.baselines import DaliCutLoader
    from viewpipe.pipelines.dali import DaliLoader

    cfg = loader_cfg(augment=plain_augment(32), workers=1)
    full = list(build(DaliLoader, converted["dali"], cfg, device="cpu"))
    cut = list(build(DaliCutLoader, converted["dali"], cfg, device="cpu"))
    assert len(cut) == len(full) == 96 // 8
    for (va, la, ia, _, wa), (vb, lb, ib, _, wb) in zip(full, cut):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(wa, wb)
        for x, y in zip(va, vb):
            assert y.dtype == torch.uint8 and tuple(y.shape) == (8, 32, 32, 3)
            torch.testing.assert_close(x, y.permute(0, 3, 1, 2).float() / 255, atol=1e-6, rtol=0)


def test_ffcv_decode_only_yields_the_epochs_batches_without_views(converted: dict[str, Path]) -> None:
    """The FFCV decode ceiling `viewpipe bench` reports: the epoch's batches (here in index order), no views,
    each image decoded once by the backend's compiled decoder."""
    from viewpipe.pipelines.baselines import FfcvDecodeLoader

    c = build(FfcvDecodeLoader, converted["ffcv"], loader_cfg(shuffle=False, drop_last=False, augment=plain_augment(32)),
                           device="cpu")
    c.set_epoch(4)
    batches = list(c)
    assert [i for _, _, idx, *_ in batches for i in idx.tolist()] == list(range(96))
    assert all(v is None for v, *_ in batches)  # decode only: no views
    np.testing.assert_array_equal(c.decodes, np.ones(96, np.int64))


def test_stock_ffcv_loader_decodes_per_view_and_reports_indices(converted: dict[str, Path]) -> None:
    """FFCV's RandomResizedCropRGBImageDecoder once per view; the sample indices come from a second
    pipeline over the label field, and match the epoch's batches and the labels."""
    from viewpipe.formats import DatasetIndex
    from viewpipe.pipelines.baselines import StockFfcvLoader

    index = DatasetIndex.load(converted["ffcv"])
    cfg = loader_cfg(views=2)
    loader = build(StockFfcvLoader, converted["ffcv"], cfg, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 12
    for (views, labels, indices, *_), expect in zip(batches, loader.batches(0)):
        assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 and views[0].dtype == torch.float32
        assert indices.tolist() == expect.tolist()
        assert torch.equal(labels, torch.from_numpy(index.labels[expect]))
    del loader, batches
    with pytest.raises(ViewpipeError, match="no companions or fused crops"):
        build(StockFfcvLoader, converted["ffcv"], cfg, device="cpu", companions=True)


# ------------------------------------------------------------------------------------ bench rows
def test_bench_dali_rows_from_a_cached_converted_copy(image_folder: Path) -> None:
    """`--backend dali`: its decode-only ceiling, its graph without the photometric ops (once the loader has
    them), the augmenter alone on device-resident views (torch; the fused kernels only on a GPU, else a
    note), boxes on and off, and the stock DALI pipeline, beside the reference, in one run; every row's ratio
    to the stock pipeline; the converted copy the DALI rows read is made once and reused."""
    args = ("bench", "--data", str(image_folder), "--backend", "torch", "--backend", "dali", "--batch-size", "8",
            "--batches", "2", "--workers", "1", "--size", "32", "--json")
    first = viewpipe(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    rows, notes = out["rows"], out["notes"]
    assert [r["name"] for r in rows] == [
        "decode only (PIL, ceiling)", "torch, 2 views, ContrastiveCrop boxes", "torch, 2 views, RandomResizedCrop",
        "dali, decode only (CPU, ceiling)",
        "dali, 2 views, boxes, no photometric ops", STOCK, EXPERT,
        "dali, 2 views, ContrastiveCrop boxes", "dali, 2 views, RandomResizedCrop",
        "augmenter alone (torch, cpu), 2 views"]
    assert any("augmenter alone (fused): omitted" in n for n in notes)  # (no GPU here)
    stock_rows = [r for r in rows if r["name"] in (STOCK, EXPERT)]
    stock = max(r["images_per_s"] for r in stock_rows)  # the faster stock pipeline is the column's 1.00
    assert max(r["of_stock_dali"] for r in stock_rows) == 1.0 and {r["views"] for r in stock_rows} == {2}
    assert [r["name"] for r in rows if r["reference"]] == [rows[1]["name"], rows[2]["name"]]
    for r in rows:
        assert r["images"] == 2 * 8 and r["images_per_s"] > 0
        assert r["of_stock_dali"] == pytest.approx(r["images_per_s"] / stock)
    assert out["config"]["hw_decoder_load"] is None
    cache = Path(os.environ["VIEWPIPE_CACHE"]) / "converted"
    (copy,) = cache.iterdir()
    report = copy / "convert_report.json"
    stamp = report.stat().st_mtime_ns
    second = viewpipe(*args)
    assert second.returncode == 0, second.stderr
    assert list(cache.iterdir()) == [copy] and report.stat().st_mtime_ns == stamp


def test_bench_table_has_the_stock_dali_column(converted: dict[str, Path]) -> None:
    """The table: a "÷ stock DALI" column where the stock pipeline ran (the stock row 1.00), omitted rows as
    notes under it; `--hw-decoder-load` is taken (and refused outside [0, 1])."""
    res = viewpipe("bench", "--data", str(converted["dali"]), "--backend", "dali", "--batch-size", "8",
                   "--batches", "2", "--workers", "1", "--size", "32", "--hw-decoder-load", "0.5")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(ln for ln in lines if "images/s" in ln)
    assert header.split()[-3:] == ["÷", "stock", "DALI"] and "× reference" in header
    stock = [ln for ln in lines if ln.startswith("stock DALI, 2 views")]
    assert len(stock) == 2 and max(float(ln.split()[-1]) for ln in stock) == 1.0  # the faster one
    assert lines[-1].startswith("note: ")
    one_line_error(viewpipe("bench", "--data", str(converted["dali"]), "--hw-decoder-load", "1.5"),
                   "--hw-decoder-load", "[0, 1]")


def test_bench_ffcv_on_an_ffcv_only_conversion(converted: dict[str, Path]) -> None:
    """A dataset converted with `--format ffcv` alone: `--backend ffcv` runs its rows (no PIL ceiling: there
    are no shards to read images from; a note says so); backends that read the shards are refused."""
    res = viewpipe("bench", "--data", str(converted["ffcv"]), "--backend", "ffcv", "--batch-size", "8",
                   "--batches", "2", "--workers", "1", "--size", "32", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["name"] for r in out["rows"]] == [
        "ffcv, decode only (CPU threads, ceiling)", "ffcv stock RandomResizedCrop, 2 decodes per image",
        "ffcv, 2 views, ContrastiveCrop boxes", "ffcv, 2 views, RandomResizedCrop",
        "augmenter alone (torch, cpu), 2 views"]
    assert all(r["images"] == 16 and r["of_stock_dali"] is None for r in out["rows"])
    assert out["images"] == 96 and any("decode only (PIL" in n and "no DALI shards" in n for n in out["notes"])
    from viewpipe.tools.bench import bench_source, converted_data

    with pytest.raises(ViewpipeError, match="no DALI shards, which the torch, dali rows read"):
        bench_source(converted["ffcv"], "train", ["torch", "dali", "ffcv"])
    with pytest.raises(ViewpipeError, match="no DALI shards"):
        converted_data(converted["ffcv"], "train", {"dali", "ffcv"}, 1)
    with pytest.raises(ViewpipeError, match="no data.beton"):
        converted_data(converted["dali"], "train", {"dali", "ffcv"}, 1)
    assert converted_data(converted["ffcv"], "train", {"ffcv"}, 1) == converted["ffcv"]


# ------------------------------------------------------------------------------------ hw_decoder_load
def test_hw_decoder_load_config_is_checked() -> None:
    from viewpipe.trainers.config import load_config

    assert load_config(None).data.hw_decoder_load == 0.65
    assert load_config(None, ["data.hw_decoder_load=0"]).data.hw_decoder_load == 0.0
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ViewpipeError, match=rf"config.data.hw_decoder_load: expected a number in \[0, 1\], "
                                                rf"got {bad}"):
            load_config(None, [f"data.hw_decoder_load={bad}"])
    with pytest.raises(ViewpipeError, match="data.hw_decoder_load: expected float, got 'half'"):
        load_config(None, ["data.hw_decoder_load=half"])
    one_line_error(viewpipe("pretrain", "data.hw_decoder_load=2"), "data.hw_decoder_load", "[0, 1]")


def test_hw_decoder_load_reaches_the_dali_loader(image_folder: Path, tmp_path: Path) -> None:
    """`data.hw_decoder_load` goes to the DALI backend (and to no other: FFCV takes no such argument)."""
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    for backend in ("dali", "torch"):
        cfg = load_config(None, [f"data.path={image_folder}", f"data.backend={backend}", "backbone=resnet_tiny",
                                 "data.batch_size=8", "data.workers=1", "data.size=24", "ccrop.enabled=false",
                                 f"out={tmp_path / backend}", "device=cpu", "knn_every=0",
                                 "data.hw_decoder_load=0.25"])
        t = Trainer(cfg)
        try:
            loader = t.loader(0)
            assert getattr(loader, "hw_decoder_load", None) == (0.25 if backend == "dali" else None)
        finally:
            t.close()


def test_bench_train_passes_hw_decoder_load(image_folder: Path) -> None:
    """`bench --train --hw-decoder-load` reaches the trainer's config (data.hw_decoder_load) and runs."""
    res = viewpipe("bench", "--train", "--data", str(image_folder), "--backend", "dali", "--batch-size", "8",
                   "--batches", "2", "--workers", "1", "--size", "24", "--hw-decoder-load", "0.4", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)["rows"]
    assert [r["name"] for r in rows][1:] == ["dali loader, 2 views, boxes"]
    one_line_error(viewpipe("bench", "--train", "--data", str(image_folder), "--hw-decoder-load", "-1"),
                   "--hw-decoder-load")


def test_bench_train_profile_writes_a_trace_of_each_row(image_folder: Path, tmp_path: Path) -> None:
    """`bench --train --profile DIR`: one Chrome trace per row, each step split into the loader's hand-out and
    the step, the timing unchanged (the traced steps come after it)."""
    res = viewpipe("bench", "--train", "--data", str(image_folder), "--backend", "torch", "--batch-size", "8",
                   "--batches", "2", "--workers", "1", "--size", "24", "--profile", str(tmp_path / "prof"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)["rows"]
    traces = sorted((tmp_path / "prof").glob("*.pt.trace.json"))
    assert len(traces) == len(rows) == 2
    for trace in traces:
        names = [e.get("name") for e in json.loads(trace.read_text())["traceEvents"]]
        assert names.count("viewpipe: next batch") == names.count("viewpipe: train_step") == 10


def test_natural_size_data_has_the_sizes_quality_and_entropy_it_states(image_folder: Path, tmp_path: Path) -> None:
    """`bench --make-data`'s writer: frames drawn from its stated distribution (a χ² test, fixed seed), quality
    90 (the quantisation tables PIL writes at 90), and, after calibrating the noise on the images at hand,
    ImageNet's bytes per pixel within 15 %; natural.json says what was written."""
    from collections import Counter

    from PIL import Image

    from viewpipe.tools.bench_data import IMAGENET_BYTES_PER_PIXEL, SIZES, make_natural

    n = 160
    out = make_natural(image_folder, tmp_path / "natural", n, seed=0, workers=2)  # (the files do not depend on it)
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == n
    frames, bytes_, pixels = Counter(), 0, 0
    reference = io.BytesIO()
    Image.new("RGB", (8, 8)).save(reference, format="JPEG", quality=90)
    q90 = Image.open(reference).quantization
    for f in files:
        with Image.open(f) as img:
            frames[(img.height, img.width)] += 1
            assert img.quantization == q90
            pixels += img.height * img.width
        bytes_ += f.stat().st_size
    weights = np.array([w for *_, w in SIZES]) / sum(w for *_, w in SIZES)
    observed = np.array([frames[(h, w)] for h, w, _ in SIZES])
    assert observed.sum() == n
    chi2 = float((((observed - n * weights) ** 2) / (n * weights)).sum())
    assert chi2 < 27.88  # χ²(9 dof) at p = 0.001
    assert abs(bytes_ / pixels / IMAGENET_BYTES_PER_PIXEL - 1) < 0.15
    stated = json.loads((out / "natural.json").read_text())
    assert stated["count"] == n and stated["bytes"] == bytes_ and stated["noise_sigma"] > 0
    assert sum(stated["frames"].values()) == n and stated["mean_pixels"] == pixels / n
    assert make_natural(image_folder, out, n) == out and len(list(out.rglob("*.jpg"))) == n  # kept, not redone
