"""The ContrastiveCrop updater (SPEC.md §1): on its schedule, a no-grad pass of the online backbone over
clean images of the whole training set, heatmap → box with the core function, shared among ranks and
gathered back into dataset order, written into the SampleState that the running loaders read."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from viewpipe.boxes import boxes_from_features
from viewpipe.dist import barrier
from viewpipe.sources import Source
from viewpipe.state import SampleState
from viewpipe.trainers.clean import CleanOptions
from viewpipe.trainers.config import TrainConfig
from viewpipe.trainers.models import Backbone


class BoxUpdater:
    """When boxes are recomputed (`due`), whether an epoch's crops use them (`use_box`), and the update
    itself. Schedule as the official code: an update after epoch e when e ≥ warmup, e % interval == 0 and e
    is not the last; the epochs after the first update use ContrastiveCrop, those before RandomResizedCrop."""

    def __init__(self, cfg: TrainConfig, source: Source, clean: CleanOptions, out: Path) -> None:
        self.cfg, self.c, self.source, self.out = cfg, cfg.ccrop, source, Path(out)
        self.clean = replace(clean, size=self.c.size or clean.size)  # the box pass's clean images
        self.updates = 0

    def due(self, epoch: int) -> bool:
        c = self.c
        return c.enabled and epoch >= c.warmup and epoch % max(1, c.interval) == 0 and epoch != self.cfg.epochs - 1

    def use_box(self, epoch: int) -> bool:
        return any(self.due(e) for e in range(self.c.warmup, epoch))

    def boxes(self, backbone: Backbone) -> np.ndarray:
        """(N, 4) boxes of the whole dataset in dataset order, on every rank."""
        from viewpipe.trainers.clean import dataset_outputs, eval_mode

        size = self.clean.size
        with eval_mode(backbone):
            out = dataset_outputs(lambda x: boxes_from_features(backbone(x), (size, size), self.c.threshold),
                                  self.source, self.clean, desc="boxes")
        return out.cpu().numpy().astype(np.float32)

    def update(self, backbone: Backbone, state: SampleState, epoch: int, writer: bool, main: bool) -> dict[str, Any]:
        """Compute and publish the boxes (`writer`: local rank 0 of each node writes its node's segment); the
        main rank saves a PNG grid of images with their boxes. Returns what to log."""
        t0 = time.perf_counter()
        boxes = self.boxes(backbone)
        if writer:
            state.set_boxes(boxes, epoch=epoch)
        barrier()  # every node's segment holds the new boxes before training goes on
        self.updates += 1
        record: dict[str, Any] = {"box_update": self.updates, "box_seconds": time.perf_counter() - t0,
                                  "box_area": float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))}
        if main and self.c.grid:
            path = self.out / f"boxes_epoch{epoch:04d}.png"
            box_grid(self.source, boxes, path, n=self.c.grid)
            record["box_grid"] = str(path)
        return record


def box_grid(source: Source, boxes: np.ndarray, path: Path, n: int = 32, side: int = 96, cols: int = 8) -> None:
    """A PNG of `n` images spread over the dataset, each resized to side×side, with its box drawn in red."""
    from PIL import Image, ImageDraw

    from viewpipe.pipelines.reference import decode_rgb

    n = min(n, len(source))
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * side, rows * side), "white")
    draw = ImageDraw.Draw(grid)
    for j, i in enumerate(np.linspace(0, len(source) - 1, n).round().astype(int).tolist()):  # across classes
        img = decode_rgb(source.read(i), source.describe(i)).resize((side, side), Image.BILINEAR)
        x, y = (j % cols) * side, (j // cols) * side
        grid.paste(img, (x, y))
        h0, w0, h1, w1 = boxes[i].tolist()
        draw.rectangle([x + w0 * side, y + h0 * side, x + w1 * side - 1, y + h1 * side - 1], outline=(255, 0, 0),
                       width=2)
    grid.save(path)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of normalised boxes (h0, w0, h1, w1)."""
    ih = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iw = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ih * iw
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)
