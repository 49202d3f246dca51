"""Boxes derived from the live heatmaps of a SampleState, bit for bit as `viewpipe.boxes.boxes_from_heatmaps(
heatmaps.float() / 255, (H, W), threshold)` gives them, at a fraction of its cost.

Why it is exact and cheap. The bilinear upsampling (align_corners=False) is separable: up = Wr · X · Wcᵀ, each
output row (column) a convex combination of two neighbouring input rows (columns). Outputs interpolated from
the same pair of nodes form a run, along which the value is linear in a weight monotone in the output, so its
maximum over a run is at the run's first or last output. Hence "does row i hold a pixel above t" needs only the
columns that end runs (at most 2K), and "does a run of rows hold one" only its end rows: the rows of the first
and the last run that may hold one are then scanned for the box's top and bottom edges, and likewise for the
columns. The weights are torch's own (read from `F.interpolate` on one-hot inputs), the sums float64; they
differ from torch's float32 pixels by under 1e-6. A decision is taken only where a value is more than `EPS`
(4e-6) above or below the threshold; a sample with an undecided value that could move an edge is boxed from
torch's own upsampled pixels (compared in float32, as torch compares a float tensor with a Python float).
Exact by construction, checked against `boxes_from_heatmaps` on random maps, thresholds and sizes. The
fallback is rare: about 1% of smooth heatmaps at t = 0.1 (an interpolated value within 4e-6 of t), and
plateaus lying exactly at a threshold of k/255.

`LiveBoxes(state)` is what a loader's planner reads: the boxes of the current heatmaps, threshold and input
size as the boxes table holds them (invalid ones, such as a box one row high, the full image: `sanitize_boxes`).
While the table is the one the box pass derived at exactly these (`SampleState.boxes_key`), it is read as it
is, at today's cost; after a threshold change the boxes are derived here, cached per sample until the key
changes again. Without published heatmaps: the boxes table.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import numpy as np

from viewpipe.state import sanitize_boxes

EPS = 4e-6  # decisions nearer the threshold than this go to boxes_from_heatmaps (float32 error: < 1e-6)
_CHUNK = 1024  # samples derived at once (bounds the working memory: about 2 · chunk · 2K · max(H, W) float64)


@lru_cache(maxsize=64)
def _axis(k: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear weights (n, k) float64 of upsampling k → n samples (align_corners=False), read from
    `F.interpolate` of one-hot inputs, and the runs of outputs interpolated from the same pair of nodes: their
    first and last outputs (the candidates: along a run the value is linear, its maximum at an end)."""
    import torch
    import torch.nn.functional as F

    eye = torch.eye(k, dtype=torch.float32).reshape(k, 1, k, 1)
    w = F.interpolate(eye, size=(n, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.double().numpy()
    lower = (w != 0).argmax(1)
    starts = np.flatnonzero(np.r_[True, lower[1:] != lower[:-1]])
    ends = np.r_[starts[1:] - 1, n - 1]
    for a in (w, starts, ends):
        a.setflags(write=False)
    return w, starts, ends


def _scan(y: np.ndarray, w: np.ndarray, start: np.ndarray, end: np.ndarray, t: float, eps: float,
          forward: bool) -> tuple[np.ndarray, np.ndarray]:
    """Within one run per sample (outputs start..end), the first (`forward`) or last output surely above t,
    and whether that is undecided (no sure one, or an output within eps of t before it)."""
    L = int((end - start).max()) + 1
    idx = np.minimum(start[:, None] + np.arange(L), end[:, None])  # (B, L), the run's last output repeated
    if not forward:
        idx = idx[:, ::-1]
    # (B, L): each output's maximum over the other axis's candidates (y is (B, c, K): reduced over c, a middle
    # axis, which NumPy does as contiguous elementwise maxima)
    vals = np.matmul(y, w[idx].transpose(0, 2, 1)).max(1)
    sure = vals > t + eps
    p = sure.argmax(1)
    before = np.arange(L) < p[:, None]
    unsure = ~sure.any(1) | ((np.abs(vals - t) <= eps) & before).any(1)
    return idx[np.arange(len(idx)), p], unsure


def _axis_edges(x: np.ndarray, n: int, other: tuple[np.ndarray, np.ndarray, np.ndarray], t: float,
                eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First and last output along the rows of x (B, K, K) upsampled to n with a pixel above t, whether there
    is one, and whether the sample must go to the reference. Only the other axis's candidate outputs are
    evaluated, and along this axis only the run ends, then the first and the last run that may hold one."""
    w, starts, ends = _axis(x.shape[1], n)
    wo, so, eo = other
    y = np.matmul(wo[np.unique(np.r_[so, eo])], x.transpose(0, 2, 1))  # (B, c, K): the other axis's candidates
    hi = np.maximum(np.matmul(y, w[starts].T).max(1), np.matmul(y, w[ends].T).max(1))  # (B, runs): run maxima
    live = hi >= t - eps  # runs with a pixel above t - eps; every other pixel of the axis is surely below t
    found = live.any(1)
    q0, q1 = live.argmax(1), live.shape[1] - 1 - live[:, ::-1].argmax(1)
    first, unsure0 = _scan(y, w, starts[q0], ends[q0], t, eps, forward=True)
    last, unsure1 = _scan(y, w, starts[q1], ends[q1], t, eps, forward=False)
    return first, last, found, found & (unsure0 | unsure1)


def _derive_chunk(heatmaps: np.ndarray, size: tuple[int, int], t: float, eps: float) -> np.ndarray:
    """`derive_boxes` of at most a chunk of samples."""
    K = heatmaps.shape[1]
    H, W = size
    x = heatmaps.astype(np.float64) / 255
    r0, r1, found_r, unsure_r = _axis_edges(x, H, _axis(K, W), t, eps)
    c0, c1, found_c, unsure_c = _axis_edges(x.transpose(0, 2, 1), W, _axis(K, H), t, eps)
    h, w = np.float32(H), np.float32(W)
    boxes = np.stack([r0.astype(np.float32) / h, c0.astype(np.float32) / w,
                      r1.astype(np.float32) / h, c1.astype(np.float32) / w], 1)
    boxes[~found_r] = (0.0, 0.0, 1.0, 1.0)
    fallback = np.flatnonzero(unsure_r | unsure_c | (found_r != found_c))
    if len(fallback):
        boxes[fallback] = _upsampled_boxes(heatmaps[fallback], size, t)
    return boxes


def _upsampled_boxes(heatmaps: np.ndarray, size: tuple[int, int], t: float) -> np.ndarray:
    """`exact_boxes` with only the upsampling in torch (its float32 pixels); the comparison as torch makes
    it (a Python float against a float32 tensor: in float32) and the edges in NumPy, to spare torch's per-op
    cost on the few samples that need it."""
    import torch
    import torch.nn.functional as F

    hm = torch.from_numpy(np.ascontiguousarray(heatmaps, dtype=np.uint8)).float() / 255
    up = F.interpolate(hm[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    above = up > np.float32(t)
    rows, cols = above.any(2), above.any(1)
    H, W = size
    r0, c0 = rows.argmax(1), cols.argmax(1)
    r1, c1 = H - 1 - rows[:, ::-1].argmax(1), W - 1 - cols[:, ::-1].argmax(1)
    h, w = np.float32(H), np.float32(W)
    boxes = np.stack([r0.astype(np.float32) / h, c0.astype(np.float32) / w,
                      r1.astype(np.float32) / h, c1.astype(np.float32) / w], 1)
    boxes[~rows.any(1)] = (0.0, 0.0, 1.0, 1.0)
    return boxes


def exact_boxes(heatmaps: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """The reference: `boxes_from_heatmaps(heatmaps.float() / 255, size, threshold)` of uint8 heatmaps, (B, 4)."""
    import torch

    from viewpipe.boxes import boxes_from_heatmaps

    hm = torch.from_numpy(np.ascontiguousarray(heatmaps, dtype=np.uint8))
    return boxes_from_heatmaps(hm.float() / 255, (int(size[0]), int(size[1])), threshold).numpy()


def derive_boxes(heatmaps: np.ndarray, size: tuple[int, int], threshold: float, eps: float = EPS) -> np.ndarray:
    """(B, 4) float32 boxes of uint8 heatmaps (B, K, K) upsampled to `size` (H, W) at `threshold`, equal bit for
    bit to `exact_boxes` (see the module's docstring); vectorised, in chunks."""
    heatmaps = np.asarray(heatmaps, dtype=np.uint8)
    if heatmaps.ndim != 3 or heatmaps.shape[1] != heatmaps.shape[2] or not heatmaps.shape[1]:
        from viewpipe.errors import ViewpipeError

        raise ViewpipeError(f"heatmaps must be (B, K, K) with K >= 1, got shape {heatmaps.shape}")
    size = (int(size[0]), int(size[1]))
    out = np.empty((len(heatmaps), 4), np.float32)
    for s in range(0, len(heatmaps), _CHUNK):
        out[s : s + _CHUNK] = _derive_chunk(heatmaps[s : s + _CHUNK], size, float(threshold), eps)
    return out


class LiveBoxes:
    """The boxes a loader crops by, once heatmaps are published those of the live heatmaps at the live threshold
    and input size: the boxes table while it was derived at exactly these (`boxes_key`), else derived here
    (`derive_boxes`, invalid boxes the full image as in the table) and cached per sample until the heatmaps, the
    threshold or the input size change (`heatmap_key`): each sample derived once per change, the cache N×4
    float32 plus N flags per process. Before heatmaps are published (or without a heatmap table): the table."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self._key: tuple | None = None
        self._boxes = np.zeros((0, 4), np.float32)
        self._done = np.zeros(0, bool)
        self._lock = threading.Lock()  # planners may run on several threads (a backend's callbacks)

    def __getstate__(self) -> dict:
        return {"state": self.state}  # a copy in another process starts with an empty cache

    def __setstate__(self, d: dict) -> None:
        self.__init__(d["state"])

    def derived(self) -> bool:
        """Whether heatmaps are published: boxes are theirs (read from the table or derived)."""
        return self.state.heatmap_key() is not None

    def boxes(self, indices: np.ndarray) -> np.ndarray:
        """(B, 4) float32 boxes of `indices` for the state's current version."""
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            return self._boxes_locked(indices)

    def _boxes_locked(self, indices: np.ndarray) -> np.ndarray:
        """`boxes` under the cache's lock; retried when the state changes while it reads."""
        st = self.state
        while True:
            key = st.heatmap_key()
            if key is None:
                return st.boxes(indices)
            if st.boxes_key() == key:  # the table is these heatmaps' boxes at this threshold
                out = st.boxes(indices)
                if st.boxes_key() == key == st.heatmap_key():
                    return out
                continue
            if key != self._key:
                self._key, self._done = key, np.zeros(len(st), bool)
                if len(self._boxes) != len(st):
                    self._boxes = np.zeros((len(st), 4), np.float32)
            todo = np.unique(indices[~self._done[indices]])
            if not len(todo):
                return self._boxes[indices]
            heat = st.heatmaps(todo)
            if st.heatmap_key() != key:  # republished meanwhile: these rows may be of the next generation
                continue
            t = float(np.int64(key[1]).view(np.float64))
            self._boxes[todo] = sanitize_boxes(derive_boxes(heat, (key[2] >> 32, key[2] & 0xFFFF_FFFF), t))[0]
            self._done[todo] = True
            return self._boxes[indices]
