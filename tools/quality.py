"""`viewpipe quality`: the CIFAR-10 quality table, a benchmark of representations rather than of speed. Eleven
rows (MoCo v2, SimCLR, BYOL and SimSiam, each with and without ContrastiveCrop, CsMl as released (last stage
only), CsMl multi-level, SNCLR: configs/<row>_cifar10.yaml, ResNet-18, the memory backend by default)
pretrained at the same epochs and batch size and scored by the kNN monitor (k = 200, τ = 0.1) on the
test images after every `--knn-every` epochs and, at the end of each row, by a linear probe on the frozen backbone
(`--linear-epochs`, on clean features: no augmentation); each row's training speed is also measured on synthetic
views already on the device, so the table says how far the loader keeps the GPU busy. Writes quality.md (the
table), quality.json and knn_per_epoch.png.

Shorter runs than the configs' 500 epochs scale every schedule counted in epochs (ContrastiveCrop's warm-up and
box interval, CsMl's weight switch and mining interval, the lr warm-up) by epochs / 500, at least 1, so that each
method's schedule keeps its shape; another batch size than the configs' scales the learning rate linearly. On a subset (`--train-images N`) MoCo's and CsMl's queues and SNCLR's bank
are capped at N keys: longer, they would hold keys of the randomly initialised network for the whole run.
Each row is its own run folder: an interrupted table resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from viewpipe.errors import ViewpipeError

ROWS: dict[str, str] = {  # row → its name in the table; the config is configs/<row>_cifar10.yaml
    "mocov2": "MoCo v2",
    "mocov2_ccrop": "MoCo v2 + ContrastiveCrop",
    "simclr": "SimCLR",
    "simclr_ccrop": "SimCLR + ContrastiveCrop",
    "byol": "BYOL",
    "byol_ccrop": "BYOL + ContrastiveCrop",
    "simsiam": "SimSiam",
    "simsiam_ccrop": "SimSiam + ContrastiveCrop",
    "csml": "CsMl (the release: last stage only)",
    "csml_multilevel": "CsMl, multi-level (viewpipe's design)",
    "snclr": "SNCLR",
}
# kNN top-1 % from a third-party small-scale table (ResNet-18, CIFAR-10)
PUBLISHED = {"mocov2": "87.82 (a third-party table)", "snclr": "87.36 (a third-party table)"}


@dataclass
class QualityConfig:
    """One table: the data, the common epochs and batch size, and where the runs go."""

    data: str = ""  # CIFAR-10 as a .npz JPEG collection with train and test splits (required)
    out: str = "runs/quality"
    epochs: int = 100
    batch_size: int = 512
    train_images: int = 0  # 0: all 50,000 (the first N in the official order otherwise)
    test_images: int = 0  # 0: all 10,000
    knn_every: int = 1
    linear_epochs: int = 100  # the linear probe after each row (0: none); on clean features, no augmentation
    synthetic_steps: int = 20  # steps of each row timed on synthetic views on the device (0: not measured)
    backend: str = ""  # empty: the configs' (memory: CIFAR-10 decoded once into GPU memory)
    backbone: str = ""  # empty: the configs' (resnet18_cifar)
    device: str = "auto"
    workers: int = 0  # 0: all cores
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    overrides: list[str] = field(default_factory=list)  # for every row, e.g. log_every=50


def subset_npz(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    """A copy of the JPEG collection `src` with the first n_train / n_test images of its train / test splits
    (0: all), in the same layout (the bytes are copied, never re-encoded)."""
    if dst.is_file():
        return dst
    arrays: dict[str, np.ndarray] = {}
    with np.load(src, allow_pickle=False) as z:
        for split, n in (("train", n_train), ("test", n_test)):
            off = z[f"{split}_offsets"]
            n = len(off) - 1 if n <= 0 else min(n, len(off) - 1)
            arrays[f"{split}_jpeg"] = z[f"{split}_jpeg"][: off[n]]
            arrays[f"{split}_offsets"] = off[: n + 1]
            for key in ("labels", "src_path"):
                if f"{split}_{key}" in z:
                    arrays[f"{split}_{key}"] = z[f"{split}_{key}"][:n]
        for key in z.files:
            if not key.startswith(("train_", "test_")):
                arrays[key] = z[key]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, dst)
    return dst


def prepare_data(q: QualityConfig, workers: int) -> tuple[Path, Path]:
    """(the converted training set, the test collection) for the table, made once under `out/data`."""
    from viewpipe.convert import convert

    src = Path(q.data)
    if not src.is_file():
        raise ViewpipeError(f"{src}: no such file; give CIFAR-10 as a .npz JPEG collection with --data "
                            "(train_jpeg/train_offsets/train_labels and the same for test)")
    data = Path(q.out) / "data"
    npz = src if not (q.train_images or q.test_images) else subset_npz(
        src, data / f"cifar10-{q.train_images or 'all'}-{q.test_images or 'all'}.npz", q.train_images, q.test_images)
    train = data / f"{npz.stem}-train"
    from viewpipe.pipelines import get_backend

    formats = ("dali", "ffcv") if q.backend and get_backend(q.backend).reads == "ffcv" else ("dali",)
    convert(npz, train, formats=formats, workers=workers, split="train", resume=train.exists())  # done: returns
    return train, npz


def config_path(row: str) -> Path:
    from viewpipe.trainers.config import find_config

    return find_config(f"{row}_cifar10")  # the shipped config (viewpipe.configs), in a wheel as in a checkout


def row_config(row: str, q: QualityConfig, train: Path, test: Path, workers: int) -> Any:
    """The row's TrainConfig: its config file at the table's epochs, batch, data and device, with the schedules
    counted in epochs scaled by epochs / the config's epochs (at least 1) and the learning rate by the batch
    size / the config's (the linear scaling rule the configs' recipes use)."""
    from viewpipe.trainers.config import load_config

    base = load_config(config_path(row), [f"data.path={train}", f"data.test_path={test}"])
    f = q.epochs / base.epochs
    scale = lambda e: max(1, round(e * f))  # noqa: E731
    args = dict(base.method_args)
    for key in ("queue", "bank"):  # a subset: a queue longer than the data holds keys of a random network
        if q.train_images and key in args:
            args[key] = min(args[key], q.train_images)
    if base.method == "csml":
        args["switch_epoch"], args["interval"] = scale(args.get("switch_epoch", 10)), scale(args.get("interval", 5))
    over = [f"epochs={q.epochs}", f"data.batch_size={q.batch_size}", f"data.path={train}", f"data.test_path={test}",
            "data.test_split=test", f"data.workers={workers}", f"knn_every={q.knn_every}", f"device={q.device}",
            f"ccrop.warmup={scale(base.ccrop.warmup)}", f"ccrop.interval={scale(base.ccrop.interval)}",
            f"optim.warmup_epochs={base.optim.warmup_epochs * f}",
            f"optim.lr={base.optim.lr * q.batch_size / base.data.batch_size}", f"method_args={json.dumps(args)}",
            f"out={Path(q.out) / row}", "ccrop.grid=0"]
    over += [f"data.backend={q.backend}"] if q.backend else []
    over += [f"backbone={q.backbone}"] if q.backbone else []
    return load_config(config_path(row), over + list(q.overrides))


def synthetic_speed(trainer: Any, steps: int) -> float | None:
    """Images/s of the row's training steps on one of its own batches reused from device memory (no loader
    work): the speed the GPU would reach if data cost nothing, against which the row's real speed is judged.
    Run on the row's trainer once it is done (the steps change its weights). None when steps = 0."""
    import itertools

    from viewpipe.tools.bench import time_steps

    if steps <= 0:
        return None
    loader = trainer.loader(trainer.epoch)  # (the last epoch's loader: no rebuild)
    loader.set_epoch(0)
    first = next(iter(loader))  # one real batch (views, companions, groups as the row has them), reused
    own = lambda x: x.clone() if hasattr(x, "clone") else x  # noqa: E731  (loaders may reuse buffers)
    fixed = first._replace(views=[own(v) for v in first.views], **{k: own(getattr(first, k)) for k in
                                                                   first._fields if k != "views"})
    return time_steps(trainer, itertools.repeat(fixed), steps, f"{trainer.cfg.method} on synthetic views"
                      ).images_per_s


def probe(backbone: Any, cfg: Any, epochs: int) -> dict | None:
    """The linear probe of the row's frozen backbone (`viewpipe.trainers.eval.linear_probe`, the small-dataset
    protocol at `epochs`, on clean train features: no augmentation, so that it takes seconds on a GPU)."""
    from viewpipe.trainers.eval import LinearConfig, linear_probe

    if epochs <= 0:
        return None
    lin = LinearConfig(epochs=epochs, size=cfg.data.size, augment=False, workers=cfg.data.workers,
                       split_train=cfg.data.split, split_test=cfg.data.test_split, progress=False)
    res = linear_probe(backbone, cfg.data.path, cfg.data.test_path, lin, next(backbone.parameters()).device, log=None)
    return {"last": res.last_top1, "best": res.best_top1, "best_epoch": res.best_epoch, "epochs": res.epochs}


def schedule(cfg: Any, history: list[dict]) -> str:
    """What the row's schedule did in this run's budget, epochs counted from 1: when the ContrastiveCrop boxes
    were updated, how often CsMl mined and when its weights switched."""
    parts = []
    boxes = [r["epoch"] + 1 for r in history if "box_update" in r]
    if cfg.ccrop.enabled:
        parts.append(f"boxes after epoch{'s' if len(boxes) != 1 else ''} {', '.join(map(str, boxes))}" if boxes
                     else "no box update")
    mined = sum("nn_seconds" in r for r in history)
    if mined:
        parts.append(f"neighbours mined {mined}×")
    if cfg.method == "csml":
        parts.append(f"weights switched after epoch {cfg.method_args.get('switch_epoch', 10) + 1}")
    return "; ".join(parts) or "–"


def run_row(row: str, cfg: Any, q: QualityConfig) -> dict:
    """Train one row (resuming its run folder), probe it, and return its summary; a finished row is read back."""
    from viewpipe.trainers.engine import Trainer

    out = Path(cfg.out)
    summary_path = out / "quality_row.json"
    if summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if (done.get("epochs"), done.get("batch_size"), done.get("data")) == (cfg.epochs, cfg.data.batch_size,
                                                                               cfg.data.path):
            print(f"{ROWS[row]}: finished before, read from {summary_path}")
            return done
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume="auto")
    try:
        result = trainer.fit()
        minutes = (time.perf_counter() - t0) / 60
        linear = probe(trainer.method.backbone, cfg, q.linear_epochs)
        synthetic = synthetic_speed(trainer, q.synthetic_steps)  # (after the probe: its steps change the weights)
    finally:
        trainer.close()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (
        out / "log.jsonl").is_file() else []
    speeds = [r["images_per_s"] for r in log if "images_per_s" in r]
    knn = {r["epoch"] + 1: r["knn_top1"] for r in result["history"] if "knn_top1" in r}
    summary = {"row": row, "name": ROWS[row], "method": cfg.method, "ccrop": cfg.ccrop.enabled,
               "backbone": cfg.backbone, "data": cfg.data.path, "epochs": cfg.epochs,
               "batch_size": cfg.data.batch_size, "knn": knn,
               "knn_last": knn.get(cfg.epochs), "knn_best": max(knn.values(), default=None),
               "knn_best_epoch": max(knn, key=knn.get) if knn else None,
               "images_per_s": float(np.median(speeds)) if speeds else None,
               "synthetic_images_per_s": synthetic,
               "of_synthetic": float(np.median(speeds)) / synthetic if speeds and synthetic else None,
               "linear": linear, "schedule": schedule(cfg, result["history"]), "minutes_this_run": minutes,
               "out": str(out)}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def markdown(rows: list[dict], q: QualityConfig, machine: str, n_train: int, n_test: int) -> str:
    """The table as Markdown, with what it was run on."""
    lines = [f"CIFAR-10 top-1 on {n_test:,} test images: kNN (k = 200, τ = 0.1) and a linear probe "
             f"({q.linear_epochs} epochs on clean features, no augmentation); {n_train:,} training images, "
             f"{q.epochs} epochs, batch {q.batch_size}, one seed; {machine}. Speed: median images/s of the run, and "
             "its fraction of the same steps on synthetic views already on the device.", "",
             "| method | backbone | kNN top-1, last epoch | best (epoch) | linear top-1 | images/s | × synthetic "
             "| schedule in this budget (epochs from 1) | published kNN, ResNet-18, full CIFAR-10 |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        best = "–" if r["knn_best"] is None else f"{r['knn_best']:.2f} ({r['knn_best_epoch']})"
        linear = (r.get("linear") or {}).get("last")
        lines.append(f"| {r['name']} | {r['backbone']} | {fmt(r['knn_last'])} | {best} | {fmt(linear)} | "
                     f"{fmt(r['images_per_s'], 0)} | {fmt(r.get('of_synthetic'))} | {r.get('schedule', '–')} | "
                     f"{PUBLISHED.get(r['row'], '–')} |")
    lines += ["", "Published reference points: ContrastiveCrop reports +0.4 to +2.0 linear top-1 over "
              "RandomResizedCrop (its Table 1, CIFAR-10/100, Tiny ImageNet, STL-10); the kNN column is from a "
              "third-party small-scale table (ResNet-18, full CIFAR-10, longer schedules)."]
    return "\n".join(lines) + "\n"


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (23, 190, 207), (127, 127, 127)]  # one per row (tab10's)


def plot_knn(rows: list[dict], path: Path, title: str, width: int = 900, height: int = 540) -> None:
    """A width×height PNG line chart of kNN top-1 against epoch, one line (with markers) per row, the legend
    beside the axes (matplotlib, Agg: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = [(r["name"], sorted((int(e), v) for e, v in r["knn"].items())) for r in rows if r["knn"]]
    ys = [v for _, s in series for _, v in s] or [0.0]
    y0 = max(0.0, math.floor(min(ys) / 10) * 10)
    y1 = min(100.0, max(y0 + 10, math.ceil(max(ys) / 10) * 10))
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.11, 0.62, 0.8))
    for j, (name, s) in enumerate(series):
        ax.plot([e for e, _ in s], [v for _, v in s], "-o", color=np.array(COLOURS[j % len(COLOURS)]) / 255,
                linewidth=2, markersize=5, label=name)
    ax.set_ylim(min(y0, y1 - 10), y1)  # (every score 100: the axis still spans 10 points)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.grid(True, color="0.88")
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title=title)
    ax.title.set_fontsize(9)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)
    fig.savefig(path, dpi=100)


def quality(q: QualityConfig) -> list[dict]:
    """Run (or resume) every row of the table and write quality.md, quality.json and knn_per_epoch.png."""
    import torch

    unknown = [r for r in q.rows if r not in ROWS]
    if unknown:
        raise ViewpipeError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    workers = q.workers or max(1, os.cpu_count() or 1)
    if not torch.cuda.is_available() or q.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    train, test = prepare_data(q, workers)
    rows = []
    for row in q.rows:
        print(f"== {ROWS[row]}", flush=True)
        rows.append(run_row(row, row_config(row, q, train, test, workers), q))
        write_outputs(rows, q, train, test)
    return rows


def write_outputs(rows: list[dict], q: QualityConfig, train: Path, test: Path) -> None:
    from viewpipe.sources import open_source
    from viewpipe.tools.bench import machine

    out = Path(q.out)
    n_train, n_test = len(open_source(train)), len(open_source(test, "test"))
    where = machine()
    (out / "quality.md").write_text(markdown(rows, q, where, n_train, n_test))
    (out / "quality.json").write_text(json.dumps({"machine": where, "rows": rows}, indent=2))
    plot_knn(rows, out / "knn_per_epoch.png", f"CIFAR-10, {n_train:,} train images, batch {q.batch_size}, {where}")


def quality_main(args: argparse.Namespace) -> int:
    q = QualityConfig(data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                      train_images=args.train_images, test_images=args.test_images, knn_every=args.knn_every,
                      linear_epochs=args.linear_epochs, synthetic_steps=args.synthetic_steps,
                      backend=args.backend, backbone=args.backbone, device=args.device, workers=args.workers,
                      rows=args.rows.split(",") if args.rows else list(ROWS), overrides=list(args.overrides))
    quality(q)
    print((Path(q.out) / "quality.md").read_text())
    print(f"plot: {Path(q.out) / 'knn_per_epoch.png'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quality", help="the CIFAR-10 quality table: eleven rows, kNN per epoch and a linear probe",
                       description="Pretrain MoCo v2, SimCLR, BYOL and SimSiam, each with and without "
                       "ContrastiveCrop, CsMl (as released and multi-level) and SNCLR (configs/*_cifar10.yaml) at the same epochs "
                       "and batch size, score each with the kNN monitor and a linear probe, and write OUT/quality.md, OUT/quality.json and OUT/knn_per_epoch.png. "
                       "Resumes an interrupted table.")
    p.add_argument("--data", required=True, help="CIFAR-10 as a .npz JPEG collection with train and test splits "
                   "(train_jpeg, train_offsets, train_labels; test_*)")
    p.add_argument("--out", default=QualityConfig.out)
    p.add_argument("--epochs", type=int, default=QualityConfig.epochs)
    p.add_argument("--batch-size", type=int, default=QualityConfig.batch_size)
    p.add_argument("--train-images", type=int, default=0, help="use the first N training images (default: all)")
    p.add_argument("--test-images", type=int, default=0, help="use the first N test images (default: all)")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between kNN scores (and after the last)")
    p.add_argument("--linear-epochs", type=int, default=QualityConfig.linear_epochs,
                   help="linear probe after each row, on clean features (0: none)")
    p.add_argument("--synthetic-steps", type=int, default=QualityConfig.synthetic_steps,
                   help="steps of each row timed on synthetic views on the device, for the × synthetic column "
                   "(0: not measured)")
    p.add_argument("--rows", default="", help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    p.add_argument("--backend", default="", metavar="NAME",
                   help="a registered backend (default: the configs' memory backend, the decoded dataset kept on "
                   "the device)")
    p.add_argument("--backbone", default="", help="default: the configs' (resnet18_cifar)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=0, help="loader workers (default: all cores)")
    p.add_argument("overrides", nargs="*", help="config overrides for every row, e.g. log_every=50")
    p.set_defaults(func=quality_main)
