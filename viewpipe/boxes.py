"""Heatmap → box, the ContrastiveCrop box update (Peng et al., "Crafting Better Contrastive Views for Siamese
Representation Learning", CVPR 2022, arXiv:2202.03278), batched in torch on any device.

The last stage's feature map is summed over channels, min-max normalised per image, upsampled bilinearly
to the input size and thresholded; the box is the tight rectangle around every pixel above the threshold,
as the official code computes it: (first row / H, first column / W, last row / H, last column / W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def heatmaps_from_features(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature maps → (B, h, w) heatmaps in [0, 1]: channel sum, per-image min-max.
    A constant map (no information) becomes all zeros, which `boxes_from_heatmaps` turns into the full box."""
    maps = features.float().sum(dim=1)
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - lo)
    return torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(maps))


def boxes_from_heatmaps(
    heatmaps: torch.Tensor, input_size: tuple[int, int], threshold: float = 0.1
) -> torch.Tensor:
    """(B, h, w) heatmaps in [0, 1] → (B, 4) float32 boxes (h0, w0, h1, w1) normalised to [0, 1).

    Maps are upsampled bilinearly (align_corners=False) to `input_size`; a map with no pixel above
    `threshold` gives the full box (0, 0, 1, 1).
    """
    H, W = input_size
    up = F.interpolate(heatmaps.float()[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    above = up > threshold
    rows, cols = above.any(dim=2), above.any(dim=1)  # (B, H), (B, W)
    r0 = rows.int().argmax(dim=1)
    r1 = H - 1 - rows.flip(1).int().argmax(dim=1)
    c0 = cols.int().argmax(dim=1)
    c1 = W - 1 - cols.flip(1).int().argmax(dim=1)
    boxes = torch.stack([r0 / H, c0 / W, r1 / H, c1 / W], dim=1).float()
    full = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    return torch.where(rows.any(dim=1)[:, None], boxes, full)


def boxes_from_features(
    features: torch.Tensor, input_size: tuple[int, int], threshold: float = 0.1
) -> torch.Tensor:
    """The whole ContrastiveCrop box update for a batch of last-stage feature maps (B, C, h, w)."""
    return boxes_from_heatmaps(heatmaps_from_features(features), input_size, threshold)
