"""`viewpipe bench --pass`: the passes over the whole dataset (ContrastiveCrop's box update, CsMl's mining,
the kNN monitor) through each backend's clean-pass reader, against the PIL pass, on the same data in one run.

Rows, per backend: the clean images alone (images/s, and how far they are from PIL's: the max and mean
absolute difference per pixel, in uint8 levels), then the box update with the forward of `--backbone`
(wall time for the dataset). With `--train-speed` (the images/s an epoch trains at, e.g. from `viewpipe bench
--train`) the share of an epoch each box update costs."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from viewpipe.sources import Source


@dataclass
class PassRow:
    """One clean pass: what read it, how many images in how long, its pixels' distance from PIL's."""

    name: str
    images: int
    seconds: float
    max_diff: float | None = None  # uint8 levels, against the PIL pass
    mean_diff: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def clean_images(source: Source, options: Any) -> tuple[Any, float]:
    """Every clean image of `source` read through `options.backend`, as uint8 levels (float32, CPU), and the
    pass's wall time (the loader's start-up included, as a pass pays it)."""
    import torch

    from viewpipe.trainers.clean import dataset_outputs

    mean = torch.tensor(options.mean).view(1, 3, 1, 1)
    std = torch.tensor(options.std).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    out = dataset_outputs(lambda x: ((x.float().cpu() * std + mean) * 255).round().to(torch.uint8), source, options,
                          desc=f"clean pass {options.backend}")
    return out.float(), time.perf_counter() - t0


def read_rows(source: Source, backends: list[str], options: Any) -> list[PassRow]:
    """The PIL pass (the reference backend), then each backend's clean pass with its distance from PIL's."""
    pil, seconds = clean_images(source, replace(options, backend="torch"))
    rows = [PassRow(f"PIL pass (torch backend, {options.workers} workers)", len(pil), seconds)]
    for name in (b for b in backends if b != "torch"):
        x, seconds = clean_images(source, replace(options, backend=name))
        d = (x - pil).abs()
        rows.append(PassRow(f"{name} clean pass", len(x), seconds, float(d.max()), float(d.mean())))
    return rows


def box_rows(source: Source, backends: list[str], options: Any, backbone: str) -> list[PassRow]:
    """The box update (the backbone's forward on every clean image, heatmaps, boxes) through each backend."""
    from viewpipe.trainers.ccrop import box_pass
    from viewpipe.trainers.models import build_backbone

    model = build_backbone(backbone).to(options.device)
    if options.channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
    rows = []
    for name in ["torch", *(b for b in backends if b != "torch")]:
        t0 = time.perf_counter()
        box_pass(model, source, replace(options, backend=name), 0.1)
        rows.append(PassRow(f"box update, {name}, {backbone}", len(source), time.perf_counter() - t0))
    return rows


def table(rows: list[PassRow], epoch_seconds: float | None) -> str:
    """The rows with their ratio to the PIL pass (the first row) and, given an epoch's time, their share of it."""
    base = rows[0].images_per_s
    head = f"{'':44s} {'images/s':>10s} {'× PIL':>8s} {'max diff':>9s} {'mean diff':>10s} {'seconds':>9s}"
    lines = [head + (f" {'of epoch':>9s}" if epoch_seconds else "")]
    for r in rows:
        diff = (f"{r.max_diff:9.0f} {r.mean_diff:10.3f}" if r.max_diff is not None else f"{'-':>9s} {'-':>10s}")
        line = f"{r.name:44s} {r.images_per_s:10.1f} {r.images_per_s / base:8.2f} {diff} {r.seconds:9.2f}"
        lines.append(line + (f" {r.seconds / epoch_seconds:9.1%}" if epoch_seconds else ""))
    return "\n".join(lines)


def main(args: argparse.Namespace, data: Any, backends: list[str]) -> int:
    """`viewpipe bench --pass`: every backend reads the same converted copy of `data` (shards and .beton);
    prints the read rows (the PIL pass first), then the box-update rows, with the machine."""
    import torch

    from viewpipe.tools.bench import converted_data, formats_read, machine
    from viewpipe.sources import open_source
    from viewpipe.trainers.clean import CleanOptions

    gpu = torch.cuda.is_available()
    converted = converted_data(data, args.split, formats_read(backends) | {"dali"}, args.workers)
    source = open_source(converted)
    options = CleanOptions(args.size, batch_size=args.batch_size, workers=args.workers, device="cuda" if gpu else "cpu",
                           progress=False, amp=gpu, channels_last=gpu)
    backbone = args.backbone or ("resnet50" if gpu else "resnet_tiny")
    rows = read_rows(source, backends, options)
    rows += box_rows(source, backends, options, backbone)
    epoch = len(source) / args.train_speed if args.train_speed else None
    print(f"viewpipe bench --pass: {args.data or 'generated images'} ({len(source)} images, read from {converted}), "
          f"clean {args.size}px, batch {args.batch_size}, {args.workers} workers"
          + (f"; epoch at {args.train_speed:.0f} img/s = {epoch:.1f} s" if epoch else ""))
    print(f"machine: {machine()}")
    print(table(rows, epoch))
    print("diff: |clean image − PIL's| per pixel and channel, in uint8 levels")
    return 0
