"""ContrastiveCrop window sampler (Peng et al., "Crafting Better Contrastive Views for Siamese Networks",
CVPR 2022, arXiv:2202.03278), exactly as the authors' code after the fix of their issue #16 (both corner
bounds clamped into the image on both sides).

Per view: up to `tries` RandomResizedCrop (scale, ratio) proposals; the first that fits gives the size;
its top-left corner is the box edge minus half the crop, both bounds clamped into the image, plus
(hi - lo) · Beta(α, α) — an independent draw per axis. α < 1 makes the Beta U-shaped, pushing crop
centres to the box's edges so two views overlap less. If no proposal fits: RandomResizedCrop's centre crop.
With `use_box=False` the corner is uniform over all positions: plain RandomResizedCrop.

The random numbers are drawn apart from the arithmetic (`draw`), so that the vectorised NumPy sampler every
backend's planner calls can be checked draw for draw against a scalar reference (the tests').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class CropConfig:
    """Crop-window sampling: α of the Beta, RandomResizedCrop's scale and ratio ranges, the number of tries."""

    alpha: float = 0.6
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    use_box: bool = True
    tries: int = 10

    def __post_init__(self) -> None:
        if not self.alpha > 0:  # (also rejects NaN)
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.tries < 1:
            raise ValueError(f"tries must be >= 1, got {self.tries}")


FULL_BOX = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)  # (h0, w0, h1, w1): the whole image


class CropDraws(NamedTuple):
    """The random numbers behind n windows: scale and log-ratio uniforms per try, and the corner draws
    (Beta(α, α) with boxes, uniform without), all in [0, 1)."""

    scale: np.ndarray  # (n, tries) float64
    log_ratio: np.ndarray  # (n, tries) float64
    corner: np.ndarray  # (n, 2) float64: rows, columns


def draw(rng: np.random.Generator, n: int, cfg: CropConfig) -> CropDraws:
    """Draw the random numbers for n windows."""
    corner = rng.beta(cfg.alpha, cfg.alpha, size=(n, 2)) if cfg.use_box else rng.random((n, 2))
    # Beta draws can round to exactly 1.0 in float64; the pseudo-code assumes [0, 1).
    corner = np.minimum(corner, np.nextafter(1.0, 0.0))
    return CropDraws(rng.random((n, cfg.tries)), rng.random((n, cfg.tries)), corner)


def _crop_sizes(sizes: np.ndarray, draws: CropDraws, cfg: CropConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop's (h, w) of each window from its first fitting try, and whether one fits."""
    H, W = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    area = H * W
    target = area * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * draws.scale)
    lo, hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    aspect = np.exp(lo + (hi - lo) * draws.log_ratio)
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.argmax(axis=1)
    found = fits[np.arange(len(sizes)), first]
    pick = (np.arange(len(sizes)), first)
    return h[pick].astype(np.int64), w[pick].astype(np.int64), found


def windows_from_draws(sizes: np.ndarray, boxes: np.ndarray, draws: CropDraws, cfg: CropConfig) -> np.ndarray:
    """Crop windows (n, 4) int32 as (top, left, height, width) in pixels, vectorised over the batch.

    sizes: (n, 2) image (height, width); boxes: (n, 4) normalised (h0, w0, h1, w1), valid rows.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    h, w, found = _crop_sizes(sizes, draws, cfg)
    Hi, Wi = sizes[:, 0], sizes[:, 1]

    if cfg.use_box:
        b = np.asarray(boxes, dtype=np.float64)
        top_lo = np.clip((Hi * b[:, 0]).astype(np.int64) - h // 2, 0, Hi - h)
        top_hi = np.clip((Hi * b[:, 2]).astype(np.int64) - h // 2, 0, Hi - h)
        left_lo = np.clip((Wi * b[:, 1]).astype(np.int64) - w // 2, 0, Wi - w)
        left_hi = np.clip((Wi * b[:, 3]).astype(np.int64) - w // 2, 0, Wi - w)
        top = top_lo + ((top_hi - top_lo) * draws.corner[:, 0]).astype(np.int64)
        left = left_lo + ((left_hi - left_lo) * draws.corner[:, 1]).astype(np.int64)
    else:
        top = ((Hi - h + 1) * draws.corner[:, 0]).astype(np.int64)
        left = ((Wi - w + 1) * draws.corner[:, 1]).astype(np.int64)

    return _with_fallback(Hi, Wi, top, left, h, w, found, cfg)


def _with_fallback(H: np.ndarray, W: np.ndarray, top: np.ndarray, left: np.ndarray, h: np.ndarray, w: np.ndarray,
                   found: np.ndarray, cfg: CropConfig) -> np.ndarray:
    """The (n, 4) int32 windows, those whose tries all failed replaced by RandomResizedCrop's centre crop."""
    if not found.all():
        fh, fw = _fallback_size(H, W, cfg.ratio)
        miss = ~found
        h[miss], w[miss] = fh[miss], fw[miss]
        top[miss], left[miss] = (H[miss] - fh[miss]) // 2, (W[miss] - fw[miss]) // 2
    return np.stack([top, left, h, w], axis=1).astype(np.int32)


def _fallback_size(H: np.ndarray, W: np.ndarray, ratio: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop's fallback: the largest centred crop whose aspect ratio lies in `ratio` (at least one
    pixel: torchvision's can be empty for a ratio range far from a thin image's)."""
    in_ratio = W / H
    w = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.maximum(np.rint(H * ratio[1]), 1), W))
    h = np.where(in_ratio < ratio[0], np.maximum(np.rint(W / ratio[0]), 1), H)
    return h.astype(np.int64), w.astype(np.int64)


def view_windows(
    rng: np.random.Generator, sizes: np.ndarray, boxes: np.ndarray | None, views: int, cfg: CropConfig
) -> np.ndarray:
    """(B, V, 4) windows: `views` independent windows for each of B images — the sampling every backend
    shares. sizes (B, 2) (height, width); boxes (B, 4), or None for the whole image. One `draw` of V·B
    windows ordered view-major (every image's view 0, then view 1, ...)."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    B = len(sizes)
    boxes = np.broadcast_to(FULL_BOX, (B, 4)) if boxes is None else boxes
    win = windows_from_draws(np.tile(sizes, (views, 1)), np.tile(boxes, (views, 1)), draw(rng, views * B, cfg), cfg)
    return np.ascontiguousarray(win.reshape(views, B, 4).transpose(1, 0, 2))


def heatmap_windows(rng: np.random.Generator, sizes: np.ndarray, heatmaps: np.ndarray, views: int,
                    cfg: CropConfig) -> np.ndarray:
    """(B, V, 4) windows whose centres follow each sample's heatmap (opt-in, beyond the paper): each view's size
    and ratio are RandomResizedCrop's as in `view_windows`; its centre lies in a heatmap cell drawn with
    probability ∝ the cell's value, at (cell + Beta(α, α)) / K of the image per axis (the same centre
    suppression, inside the cell), the window clamped into the image. A sample whose heatmap is all zero gets
    the box sampler's window with the full box. Draws, view-major over V·B windows: `draw` (Beta corners, as
    with boxes), then one uniform per window choosing the cell."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    B, K = len(sizes), heatmaps.shape[-1]
    n = views * B
    d = draw(rng, n, replace(cfg, use_box=True))
    u = rng.random(n)
    sz = np.tile(sizes, (views, 1))
    mass = np.tile(np.asarray(heatmaps, dtype=np.float64).reshape(B, K * K), (views, 1))
    cum = np.cumsum(mass, 1)
    cell = np.minimum((cum <= (u * cum[:, -1])[:, None]).sum(1), K * K - 1)  # first cell past u · total mass
    h, w, found = _crop_sizes(sz, d, cfg)
    H, W = sz[:, 0], sz[:, 1]
    cy = ((cell // K + d.corner[:, 0]) / K * H).astype(np.int64)
    cx = ((cell % K + d.corner[:, 1]) / K * W).astype(np.int64)
    top, left = np.clip(cy - h // 2, 0, H - h), np.clip(cx - w // 2, 0, W - w)
    cold = cum[:, -1] <= 0
    if cold.any():  # no mass: the box sampler's window over the whole image (same draws)
        top[cold] = ((H - h)[cold] * d.corner[cold, 0]).astype(np.int64)
        left[cold] = ((W - w)[cold] * d.corner[cold, 1]).astype(np.int64)
    win = _with_fallback(H, W, top, left, h, w, found, cfg)
    return np.ascontiguousarray(win.reshape(views, B, 4).transpose(1, 0, 2))


class CropSampler:
    """Draws crop windows for batches of (size, box) with its own seeded generator.

    >>> sampler = CropSampler(CropConfig(alpha=0.6), seed=0)
    >>> sampler(np.array([[480, 640]]), np.array([[0.2, 0.3, 0.7, 0.9]]))  # doctest: +SKIP
    """

    def __init__(self, cfg: CropConfig = CropConfig(), seed: int | np.random.SeedSequence | None = None) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, sizes: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        sizes = np.asarray(sizes).reshape(-1, 2)
        if boxes is None:
            boxes = np.broadcast_to(FULL_BOX, (len(sizes), 4))
        return windows_from_draws(sizes, boxes, draw(self.rng, len(sizes), self.cfg), self.cfg)
