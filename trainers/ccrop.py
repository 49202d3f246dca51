"""ContrastiveCrop's box updater. ContrastiveCrop: Peng, Wang, Zhu, Wang & You, "Crafting Better Contrastive
Views for Siamese Representation Learning", CVPR 2022 (arXiv:2202.03278; code: github.com/xyupeng/ContrastiveCrop).

The idea: random crops of one image often miss its object (object vs. background: a false positive pair), and
two crops that look alike teach little. ContrastiveCrop crops around the object, located without labels by the
model being trained, and spreads the two crops' centres apart:

- Boxes. Over the whole training set, on clean images (small datasets at their native size, ImageNet resized
  to 224×224 ignoring the aspect ratio), the online encoder in eval mode without gradients gives its last
  stage's feature map (4×4 for a CIFAR ResNet-18, 7×7 for ImageNet); summed over channels, min-max normalised
  per image, upsampled bilinearly to the input size and thresholded at t = 0.1, it gives the box: the tight
  rectangle around every pixel above t (`viewpipe.boxes`).
- Crops (`viewpipe.crop`). Each view's size and aspect ratio are RandomResizedCrop's (scale 0.2–1); its
  centre is drawn inside the box, per axis from Beta(α, α). α < 1 pushes centres toward the box's edges
  ("center-suppressed" sampling), so the two views overlap less. Only the centre is constrained: a crop may
  reach outside the box.
- Schedule (the official code, whose epochs count from 1: `DDP_moco_ccrop.py`, `for epoch in range(start_epoch,
  cfg.epochs + 1)` with `start_epoch = 1`, then `if epoch >= cfg.warmup_epochs and epoch != cfg.epochs and
  epoch % cfg.loc_interval == 0: ... update_box`): plain RandomResizedCrop for the first `warmup` epochs;
  boxes recomputed after the n-th epoch (n counted from 1) when n ≥ warmup, n % interval == 0 and n is not the
  last; the epochs after the first update crop with the boxes (`use_box = epoch >= warmup_epochs + 1`). The
  paper's recipes: small datasets 500 epochs, warmup 100, interval 100, α 0.1 (updates after epochs 100, 200,
  300, 400); ImageNet 100 epochs, warmup 20, interval 20, α 0.6 (after epochs 20, 40, 60, 80). The engine's
  epochs count from 0: the update after engine epoch e is the release's after epoch e + 1.

Published: +0.4 to +2.0 points of linear top-1 over RandomResizedCrop for SimCLR, MoCo, BYOL and SimSiam on
CIFAR-10/100, Tiny ImageNet and STL-10 (ResNet-18, 500 epochs).

Here the update is a state updater (`trainers/updaters.py`): each rank computes the heatmaps of its strided
share of the dataset, the shares are gathered back into dataset order and written into the SampleState: every
sample's heatmap (uint8, round(heatmap · 255), the last stage's K×K) with the clean input size, and the boxes
derived from those uint8 heatmaps at the state's live threshold (`viewpipe.heatmap_boxes.derive_boxes`, equal
to `boxes_from_heatmaps`). Running loaders read them live and derive their boxes from the heatmaps at the
threshold the state holds then, so `viewpipe state set-threshold` changes the crops without a new pass (the
official code's new boxes reach its DataLoader workers only because it re-creates them every epoch)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import torch

from viewpipe.boxes import heatmaps_from_features
from viewpipe.errors import ViewpipeError
from viewpipe.heatmap_boxes import derive_boxes
from viewpipe.sources import Source
from viewpipe.state import SampleState
from viewpipe.trainers.clean import CleanOptions, dataset_outputs, eval_mode
from viewpipe.trainers.config import CCropConfig
from viewpipe.trainers.models import Backbone
from viewpipe.trainers.updaters import DataContext, StateUpdater

if TYPE_CHECKING:
    from viewpipe.trainers.base import Method


def heatmaps_uint8(features: torch.Tensor) -> torch.Tensor:
    """(B, C, K, K) last-stage maps → (B, K, K) uint8 heatmaps, round(heatmap · 255): what the state keeps."""
    return (heatmaps_from_features(features) * 255).round().to(torch.uint8)


def heatmap_pass(backbone: Backbone, source: Source, options: CleanOptions) -> np.ndarray:
    """(N, K, K) uint8 heatmaps of the whole dataset in dataset order, on every rank: `backbone`'s last-stage
    maps of the clean images (options.size², eval mode, no grad) → `heatmaps_uint8`."""
    with eval_mode(backbone):
        out = dataset_outputs(lambda x: heatmaps_uint8(backbone(x)), source, options, desc="boxes")
    return out.cpu().numpy().astype(np.uint8)


def box_pass(backbone: Backbone, source: Source, options: CleanOptions, threshold: float) -> np.ndarray:
    """(N, 4) float32 boxes of the whole dataset: those of `heatmap_pass`'s uint8 heatmaps at `threshold`, as
    the loaders derive them (`boxes_from_heatmaps(heatmaps.float() / 255, (size, size), threshold)`)."""
    return derive_boxes(heatmap_pass(backbone, source, options), (options.size, options.size), threshold)


def heatmap_side(backbone: Backbone, size: int) -> int:
    """K, the side of the backbone's last-stage map at clean input size `size` (so of the state's heatmaps):
    one no-grad forward of a zero image in eval mode on the backbone's device (4 for a CIFAR ResNet-18 at 32,
    7 for a ResNet-50 at 224: the architecture's stride, measured rather than assumed)."""
    p = next(backbone.parameters())
    with eval_mode(backbone), torch.no_grad():
        shape = tuple(backbone(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)).shape)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ViewpipeError(f"ContrastiveCrop needs a square last-stage map from the backbone, got shape {shape} "
                            f"at input size {size}")
    return shape[2]


@dataclass
class BoxPassResult:
    """One box update: every sample's uint8 heatmap, the boxes derived from them at `threshold`, the clean
    input side."""

    heatmaps: np.ndarray  # (N, K, K) uint8
    boxes: np.ndarray  # (N, 4) float32
    size: int
    threshold: float


class BoxUpdater(StateUpdater):
    """ContrastiveCrop's box update as a state updater: after an epoch (the module's schedule), the online
    backbone's heatmaps of the whole training set (`heatmap_pass` at `ccrop.size`, default data.size), published
    with their input size to the sample state, and the boxes derived from them at the state's live threshold
    (ccrop.threshold when the run starts; `viewpipe state set-threshold` may change it) as its boxes; the main
    rank saves a PNG grid of images with their boxes. `use_box(epoch)`: whether the epoch's crops use the boxes
    (the epochs after the first update) or plain RandomResizedCrop (those before)."""

    name = "box"
    before_epoch = False

    def __init__(self, c: CCropConfig, epochs: int) -> None:
        super().__init__()
        self.c, self.epochs = c, epochs

    def due(self, epoch: int) -> bool:
        """After engine epoch `epoch` (from 0), i.e. after n = epoch + 1 epochs: the release's n ≥ warmup,
        n % interval == 0, n not the last."""
        c, n = self.c, epoch + 1
        return c.enabled and n >= c.warmup and n % max(1, c.interval) == 0 and n != self.epochs

    def use_box(self, epoch: int) -> bool:
        return any(self.due(e) for e in range(epoch))

    def compute(self, method: Method, data: DataContext, epoch: int) -> BoxPassResult:
        size = self.c.size or data.clean.size
        heat = heatmap_pass(method.backbone, data.source, replace(data.clean, size=size))
        threshold = data.state.threshold if data.state.has("heatmaps") else self.c.threshold
        return BoxPassResult(heat, derive_boxes(heat, (size, size), threshold), size, threshold)

    def publish(self, state: SampleState, result: BoxPassResult, epoch: int) -> None:
        """The heatmaps with their input size, then the boxes derived from them (recorded as such: loaders read
        that table until the threshold changes)."""
        if not state.has("heatmaps"):
            state.set_boxes(result.boxes, epoch=epoch)
            return
        state.set_heatmaps(result.heatmaps, input_size=(result.size, result.size))
        state.set_derived_boxes(result.boxes, result.threshold, epoch=epoch)

    def report(self, result: BoxPassResult, data: DataContext, epoch: int) -> dict[str, Any]:
        boxes = result.boxes
        record: dict[str, Any] = {"box_update": self.updates,
                                  "box_area": float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))}
        if data.main and self.c.grid:
            path = Path(data.out) / f"boxes_epoch{epoch:04d}.png"
            box_grid(data.source, boxes, path, n=self.c.grid)
            record["box_grid"] = str(path)
        return record


def box_grid(source: Source, boxes: np.ndarray, path: Path, n: int = 32, side: int = 96, cols: int = 8) -> None:
    """A PNG of `n` images spread over the dataset, each resized to side×side with its box drawn in red
    (torchvision's draw_bounding_boxes, 2 px inside the box's edges), `cols` to a row (make_grid)."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, make_grid

    from viewpipe.formats import decode_rgb

    tiles = []
    for i in np.linspace(0, len(source) - 1, min(n, len(source))).round().astype(int).tolist():  # across classes
        img = decode_rgb(source.read(i), source.describe(i)).convert("RGB").resize((side, side), Image.BILINEAR)
        h0, w0, h1, w1 = boxes[i].tolist()  # fractions of the image's sides -> xyxy pixels, edges inclusive
        xyxy = torch.tensor([[w0 * side, h0 * side, max(w0 * side, w1 * side - 1), max(h0 * side, h1 * side - 1)]])
        tiles.append(draw_bounding_boxes(torch.from_numpy(np.array(img)).permute(2, 0, 1), xyxy, colors="red",
                                         width=2))
    grid = make_grid(tiles, nrow=cols, padding=0, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of normalised boxes (h0, w0, h1, w1)."""
    ih = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iw = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ih * iw
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)
