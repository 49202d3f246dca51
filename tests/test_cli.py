"""The `viewpipe` command: help, bench output, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VIEWPIPE = [sys.executable, "-m", "viewpipe.tools"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's cache (generated images, converted copies) in a temporary folder, not the user's."""
    monkeypatch.setenv("VIEWPIPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def viewpipe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*VIEWPIPE, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands() -> None:
    res = viewpipe("--help")
    assert res.returncode == 0
    for cmd in ("bench", "state"):
        assert cmd in res.stdout
    script = Path(sys.executable).parent / "viewpipe"  # the console script beside this interpreter
    res = subprocess.run([str(script), "state", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "clean" in res.stdout


def test_bench_json(image_folder) -> None:
    res = viewpipe("bench", "--data", str(image_folder), "--backend", "torch", "--batch-size", "8", "--batches", "3",
                   "--workers", "1", "--size", "32", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    names = [r["name"] for r in out["rows"]]
    assert names[0].startswith("decode only") and len(names) == 3
    assert any("ContrastiveCrop" in n for n in names) and any("RandomResizedCrop" in n for n in names)
    for row in out["rows"]:
        assert row["images"] == 3 * 8 and row["images_per_s"] > 0
    assert out["rows"][1]["views_per_s"] == pytest.approx(2 * out["rows"][1]["images_per_s"])
    assert out["images"] == 96 and "cores" in out["machine"]


def test_bench_table(image_folder) -> None:
    res = viewpipe("bench", "--data", str(image_folder), "--backend", "torch", "--batch-size", "8", "--batches", "2",
                   "--workers", "0", "--size", "32")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("viewpipe bench:") and "images/s" in lines[2] and "reference" in lines[2]
    assert lines[3].split()[-2] == "1.00"  # the PIL decode ceiling row, relative to itself
    assert lines[4].startswith("torch, 2 views, ContrastiveCrop") and lines[4].split()[-1] == "1.00"


def _assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_errors_are_one_line(tmp_path) -> None:
    _assert_one_line_error(viewpipe("bench", "--data", str(tmp_path / "nope")), "nope", "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(viewpipe("bench", "--data", str(empty)), "no class folders")
    (empty / "cls").mkdir()
    _assert_one_line_error(viewpipe("bench", "--data", str(empty)), "no image files")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_and_corrupt_files_are_named(image_folder, tmp_path, workers: str) -> None:
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    victim = sorted((root / "cross_0").iterdir())[0]
    victim.write_bytes(b"this is not a jpeg")
    res = viewpipe("bench", "--data", str(root), "--backend", "torch", "--batch-size", "48", "--batches", "1",
                   "--workers", workers, "--size", "16")
    _assert_one_line_error(res, str(victim), "cannot decode")
    os.remove(victim)
    victim.symlink_to(tmp_path / "missing.jpg")
    res = viewpipe("bench", "--data", str(root), "--backend", "torch", "--batch-size", "48", "--batches", "1",
                   "--workers", workers, "--size", "16")
    _assert_one_line_error(res, str(victim), "cannot read")


def test_bench_needs_two_batches(image_folder) -> None:
    _assert_one_line_error(viewpipe("bench", "--data", str(image_folder), "--batch-size", "64"), "lower --batch-size")


def test_bench_ffcv_rows(image_folder) -> None:
    """`--backend ffcv`: its decode-only ceiling, FFCV's stock decoder (one decode per view), boxes on and
    off, beside the reference, in one run."""
    args = ("bench", "--data", str(image_folder), "--backend", "torch", "--backend", "ffcv", "--batch-size", "8",
            "--batches", "2", "--workers", "1", "--size", "32", "--json")
    res = viewpipe(*args)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert [r["name"] for r in rows] == [
        "decode only (PIL, ceiling)", "torch, 2 views, ContrastiveCrop boxes", "torch, 2 views, RandomResizedCrop",
        "ffcv, decode only (CPU threads, ceiling)", "ffcv stock RandomResizedCrop, 2 decodes per image",
        "ffcv, 2 views, ContrastiveCrop boxes", "ffcv, 2 views, RandomResizedCrop",
        "augmenter alone (torch, cpu), 2 views"]
    assert all(r["images"] == 2 * 8 and r["images_per_s"] > 0 for r in rows)
    assert rows[4]["views"] == 2 and rows[3]["views"] == 1


def test_bench_train_rows(image_folder) -> None:
    """`--train`: the method on synthetic views, then fed by each backend, each row against the synthetic one."""
    res = viewpipe("bench", "--train", "--data", str(image_folder), "--backend", "dali", "--backend", "ffcv",
                   "--batch-size", "8", "--batches", "2", "--workers", "1", "--size", "24", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)["rows"]
    assert [r["name"] for r in rows] == ["synthetic views on the cpu, mocov2 resnet_tiny",
                                         "dali loader, 2 views, boxes", "ffcv loader, 2 views, boxes"]
    assert rows[0]["of_synthetic"] == 1.0 and all(r["images"] == 16 and r["of_synthetic"] > 0 for r in rows)


def _jpeg_collection(path: Path, n_train: int, n_test: int) -> Path:
    """A small .npz JPEG collection in ../shared/data's layout: 4 classes of coloured 32×32 squares on noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays: dict = {}
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [230, 220, 40]])
    for split, n in (("train", n_train), ("test", n_test)):
        blobs, labels = [], rng.integers(0, 4, n)
        for label in labels:
            img = rng.integers(0, 120, (32, 32, 3))
            y, x = rng.integers(0, 16, 2)
            img[y:y + 16, x:x + 16] = colours[label]
            buf = io.BytesIO()
            Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


def test_quality_table_runs_rows_writes_table_and_plot_and_resumes(tmp_path) -> None:
    """Two rows for two epochs on a small collection (first 96 train / 48 test images): a kNN score per epoch
    per row in quality.json, the Markdown table, a PNG; CsMl's schedules scaled to the short run; a second
    invocation reads the finished rows back instead of training again."""
    from PIL import Image

    data = _jpeg_collection(tmp_path / "c.npz", 128, 64)
    out = tmp_path / "q"
    args = ("quality", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "16",
            "--train-images", "96", "--test-images", "48", "--backbone", "resnet_tiny", "--rows", "mocov2,csml",
            "--workers", "1", "--linear-epochs", "3", "--synthetic-steps", "2", "data.size=32", "knn_k=20")
    res = viewpipe(*args, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["mocov2", "csml"]
    for r in report["rows"]:
        assert sorted(r["knn"]) == ["1", "2"] and all(0 <= v <= 100 for v in r["knn"].values())
        assert r["knn_last"] == r["knn"]["2"] and r["epochs"] == 2 and r["batch_size"] == 16
        assert r["linear"]["epochs"] == 3 and 0 <= r["linear"]["last"] <= r["linear"]["best"] <= 100
        assert r["synthetic_images_per_s"] > 0 and r["of_synthetic"] == r["images_per_s"] / r["synthetic_images_per_s"]
    table = (out / "quality.md").read_text()
    assert f"| {report['rows'][0]['linear']['last']:.2f} |" in table and "× synthetic" in table
    mocov2, csml = report["rows"]  # the budget each row had: CsMl's schedule scaled to 2 epochs (switch at 1 of 500)
    assert mocov2["schedule"] == "–" and csml["schedule"] == "neighbours mined 2×; weights switched after epoch 2"
    assert f"| {csml['schedule']} |" in table
    assert "| MoCo v2 | resnet_tiny |" in table and "| CsMl (the release: last stage only) | resnet_tiny |" in table
    assert "48 test images" in table
    assert Image.open(out / "knn_per_epoch.png").size == (900, 540)
    import yaml

    row_cfg = yaml.safe_load(Path(report["rows"][0]["out"], "config.yaml").read_text())
    assert row_cfg["optim"]["lr"] == pytest.approx(0.5 * 16 / 512)  # the config's lr at its batch 512, scaled
    last = json.loads(Path(report["rows"][1]["out"], "log.jsonl").read_text().splitlines()[-1])
    assert "nn_label_agreement" in last  # mined before epoch 1 too: interval 5 of 500 epochs scaled to 1
    again = viewpipe(*args, timeout=400)
    assert again.returncode == 0 and again.stdout.count("finished before") == 2
    bad = viewpipe("quality", "--data", str(data), "--out", str(out), "--rows", "mocov3")
    _assert_one_line_error(bad, "unknown row(s) mocov3")


# ------------------------------------------------------------------------------------------------ configs
def test_pretrain_help_config_and_override_errors() -> None:
    res = viewpipe("pretrain", "--help-config")
    assert res.returncode == 0, res.stderr
    assert "data.groups[].augment" in res.stdout and "data.crop.ratio" in res.stdout and "GLOBAL" in res.stdout
    assert "mocov2_ccrop_cifar10" in res.stdout  # the shipped configs, by name
    res = viewpipe("pretrain", "--config", "mocov2_ccrop_cifar10", "optim.lrr=0.3")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "viewpipe: error: override optim.lrr=0.3: unknown key lrr in optim; known: betas, final_lr_ratio, lr, "
        "momentum, name, per_epoch, skip_nonfinite, warmup_epochs, weight_decay"], res.stderr


def test_help_imports_no_torch() -> None:
    from conftest import run_python

    res = run_python("""
        import sys
        from viewpipe.tools import cli
        cli.build_parser()
        import viewpipe.tools.pretrain
        print('torch' in sys.modules)
        """, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_quality_row_schedule_states_the_box_updates_of_its_budget() -> None:
    """A ContrastiveCrop row's schedule names the epochs (from 1) after which its boxes were updated."""
    from viewpipe.tools.quality import schedule
    from viewpipe.trainers.config import load_config

    cfg = load_config("mocov2_ccrop_cifar10", ["data.path=d", "data.test_path=t"])
    history = [{"epoch": 1}, {"epoch": 2, "box_update": 1}, {"epoch": 5, "box_update": 2}]
    assert schedule(cfg, history) == "boxes after epochs 3, 6"
    assert schedule(cfg, [{"epoch": 0}]) == "no box update"
