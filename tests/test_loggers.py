"""The loggers (`logger=`, trainers/loggers.py): a real short run with TensorBoard and W&B in offline mode (no
network) logs the same scalars to both, the box grid and the kNN curve, and its resume continues the same W&B
run; an unknown logger and a missing wandb package are one-line errors; the box grid (torchvision's
draw_bounding_boxes and make_grid) and the quality chart (matplotlib) draw what they should."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.config import load_config
from viewpipe.trainers.engine import Trainer, pretrain

from conftest import tiny_run_args  # noqa: E402
from test_runs import accumulated, records, scalars  # noqa: E402  (TensorBoard's reader)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 32768  # the .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks


def wandb_records(path: Path) -> Iterator:
    """The `wandb_internal_pb2.Record`s of an offline run's .wandb file (wandb >= 0.20 ships no Python reader:
    its Go core writes the LevelDB log format, each record a chunk header (CRC32C u32, length u16, type u8:
    full 1, first 2, middle 3, last 4) and its bytes, a block's tail under 7 bytes left as padding)."""
    from wandb.proto import wandb_internal_pb2

    data, i, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", data[:7]
    while i + 7 <= len(data):
        if BLOCK - i % BLOCK < 7:
            i += BLOCK - i % BLOCK
            continue
        _, n, kind = struct.unpack("<IHB", data[i : i + 7])
        parts, i = parts + data[i + 7 : i + 7 + n], i + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_history(out: Path) -> tuple[list[str], list[dict], list[dict]]:
    """The offline W&B runs under `out/wandb` (in the order they ran): their ids, their history rows (each
    with its `_step`) and their configs."""
    ids, rows, configs = [], [], []
    for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
                configs.append({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert ids, f"no offline W&B run in {out / 'wandb'}"
    return ids, rows, configs


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B without a network or an account: offline mode, quiet, its settings and caches under tmp_path."""
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-dir"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                       "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_logs_what_tensorboard_logs(image_folder: Path, tmp_path: Path, offline_wandb: None) -> None:
    """logger=tensorboard,wandb, W&B offline: a run stopped at step 9 and resumed to its end makes one W&B run (the
    id kept in OUT/wandb_id) whose history holds TensorBoard's scalars, names and values: the steps' at their
    global step, the epochs' (epoch/knn_top1: the kNN curve) with `epoch` = epochs done (TensorBoard's x), the
    box grid as a W&B image of the PNG's size; Ctrl-C keeps its handler; the run's config is the W&B config."""
    from viewpipe.synthetic import make_folder

    out, test = tmp_path / "run", make_folder(tmp_path / "test", n=24, size_range=(40, 64), seed=2)
    overrides = ("log_every=2", "ccrop.enabled=true", "ccrop.warmup=0", "ccrop.interval=1", "ccrop.grid=8",
                 f"data.test_path={test}", "data.test_split=train", "knn_every=1", "knn_k=5",
                 "logger=tensorboard,wandb", "wandb.tags=[test]")
    pretrain(load_config(None, tiny_run_args(image_folder, out, *overrides, "max_steps=9")))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    result = pretrain(load_config(None, tiny_run_args(image_folder, out, *overrides)), resume="auto")
    assert result["step"] == 12

    ids, rows, configs = wandb_history(out)
    assert ids == [(out / "wandb_id").read_text().strip()] * 2  # the resume continued the W&B run
    assert configs[0]["logger"] == "tensorboard,wandb" and configs[0]["wandb"]["tags"] == ["test"]
    tb = scalars(out)
    seen: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("train/"):
                seen.setdefault(k, {})[row["_step"]] = v
            elif k.startswith("epoch/"):
                seen.setdefault(k, {})[row["epoch"]] = v
    assert sorted(seen) == sorted(tb) and "epoch/knn_top1" in seen
    for tag, values in tb.items():
        assert seen[tag] == pytest.approx(values, rel=1e-6), tag
    knn = [r["knn_top1"] for r in result["history"]]
    assert seen["epoch/knn_top1"] == pytest.approx({1: knn[0], 2: knn[1]})
    assert sorted(seen["train/loss"]) == [2, 4, 6, 8, 10, 12]
    assert {r["step"]: r["loss"] for r in records(out) if "event" not in r} == pytest.approx(seen["train/loss"])

    images = [r for r in rows if "ccrop/boxes/_type" in r]
    assert [(r["epoch"], r["ccrop/boxes/_type"]) for r in images] == [(1, "image-file")]
    (tb_image,) = accumulated(out).Images("ccrop/boxes")
    assert (images[0]["ccrop/boxes/width"], images[0]["ccrop/boxes/height"]) == (tb_image.width, tb_image.height)
    assert list(out.glob("wandb/offline-run-*/files/" + images[0]["ccrop/boxes/path"]))


def test_logger_none_and_the_errors(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """logger=none: log.jsonl only; an unknown logger is one line naming the known ones; logger=wandb without
    the wandb package is one line saying what to install, before anything is built."""
    out = tmp_path / "none"
    pretrain(load_config(None, tiny_run_args(image_folder, out, "logger=none", "max_steps=1")))
    assert records(out) and not list(out.glob("events.out.tfevents.*")) and not (out / "wandb").exists()

    with pytest.raises(ViewpipeError) as info:
        load_config(None, tiny_run_args(image_folder, tmp_path / "x", "logger=tensorboard,mlflow"))
    assert str(info.value) == ("config.logger: unknown logger 'mlflow' in 'tensorboard,mlflow'; known: tensorboard, "
                               "wandb (comma-separated, e.g. logger=tensorboard,wandb; none: log.jsonl only)")

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ViewpipeError) as info:
        Trainer(load_config(None, tiny_run_args(image_folder, tmp_path / "w", "logger=tensorboard, wandb")))
    assert "\n" not in str(info.value) and "pip install viewpipe[wandb]" in str(info.value)
    assert not (tmp_path / "w").exists()


def test_box_grid_draws_each_box_in_red(tmp_path: Path) -> None:
    """box_grid: grey images resized to 16 px tiles, 3 to a row (the last row's empty tiles white), each box
    (h0, w0, h1, w1 fractions) drawn in red 2 px inside its edges, the inside left grey."""
    from PIL import Image

    from viewpipe.sources import open_source
    from viewpipe.trainers.ccrop import box_grid

    for i in range(4):
        (tmp_path / "data" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 8 * i, 32), (128, 128, 128)).save(tmp_path / "data" / "a" / f"{i}.png")
    source = open_source(tmp_path / "data", "train")
    boxes = np.array([[0.25, 0.5, 0.75, 1.0], [0, 0, 1, 1], [0.5, 0.25, 1.0, 0.75], [0, 0, 0.5, 0.5]], np.float32)
    box_grid(source, boxes, tmp_path / "grid.png", n=4, side=16, cols=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    assert grid.shape == (32, 48, 3)
    red, grey = [255, 0, 0], [128, 128, 128]
    for j, (h0, w0, h1, w1) in enumerate((boxes * 16).astype(int).tolist()):
        tile = grid[16 * (j // 3) : 16 * (j // 3 + 1), 16 * (j % 3) : 16 * (j % 3 + 1)]
        edges = [tile[h0, w0], tile[h0 + 1, (w0 + w1) // 2], tile[h1 - 1, w1 - 1], tile[(h0 + h1) // 2, w0 + 1],
                 tile[h1 - 2, w1 - 2]]
        assert all(list(p) == red for p in edges), j
        assert list(tile[(h0 + h1) // 2, (w0 + w1) // 2]) == grey, j
        if h0 > 0:
            assert list(tile[h0 - 1, (w0 + w1) // 2]) == grey, j  # nothing outside the box
    assert (grid[16:, 16:] == 255).all()  # tiles 5 and 6: white


def test_the_quality_chart_is_a_matplotlib_png(tmp_path: Path) -> None:
    """plot_knn: a width×height PNG with each row's line in its colour (tab10's), rows without scores left out."""
    from PIL import Image

    from viewpipe.tools.quality import COLOURS, plot_knn

    rows = [{"name": "MoCo v2", "knn": {"1": 20.0, "2": 31.5, "3": 35.0}},
            {"name": "SimSiam", "knn": {1: 15.0, 3: 40.0}}, {"name": "none yet", "knn": {}}]
    plot_knn(rows, tmp_path / "knn.png", "CIFAR-10, 1,000 images", width=600, height=360)
    img = np.asarray(Image.open(tmp_path / "knn.png").convert("RGB"))
    assert img.shape == (360, 600, 3)
    counts = [int((img == c).all(-1).sum()) for c in COLOURS[:3]]
    assert counts[0] > 200 and counts[1] > 200 and counts[2] == 0, counts
