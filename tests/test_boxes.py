"""Heatmap → box (viewpipe.boxes), the ContrastiveCrop box update: channel sum, per-image min-max, bilinear upsampling
(align_corners=False) to the input size, threshold 0.1, tight rectangle around every pixel above it as
(first_row/H, first_col/W, last_row/H, last_col/W); a constant map gives the full box (0, 0, 1, 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as tnf

from viewpipe.boxes import boxes_from_features, boxes_from_heatmaps, heatmaps_from_features

FULL = (0.0, 0.0, 1.0, 1.0)
# Boxes are pixel indices divided by H or W in float32; the expected values below are the same quotients rounded
# from float64, so they agree to the last bit (1e-7 only covers a possible double-rounding difference).
ATOL = 1e-7


def _reference(features: np.ndarray, input_size: tuple[int, int], t: float = 0.1) -> np.ndarray:
    """The box rule (`viewpipe.boxes`' docstring) written out per image in numpy (torch only for the bilinear
    upsampling), in float64."""
    H, W = input_size
    out = []
    for f in np.asarray(features, dtype=np.float64):
        m = f.sum(axis=0)
        lo, hi = m.min(), m.max()
        if hi == lo:
            out.append(FULL)
            continue
        m = (m - lo) / (hi - lo)
        up = tnf.interpolate(torch.from_numpy(m)[None, None], size=(H, W), mode="bilinear", align_corners=False)
        rows, cols = np.nonzero(up[0, 0].numpy() > t)
        out.append((rows.min() / H, cols.min() / W, rows.max() / H, cols.max() / W))
    return np.array(out, dtype=np.float32)


def _hot(h: int, w: int, cells: dict[tuple[int, int], float], channels: int = 1) -> torch.Tensor:
    """(1, channels, h, w) features, zero but for `cells` in channel 0."""
    f = torch.zeros(1, channels, h, w)
    for (r, c), v in cells.items():
        f[0, 0, r, c] = v
    return f


def _px(box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """A box given in pixels (r0, c0, r1, c1), normalised as the official code does."""
    H, W = size
    return torch.tensor([[box[0] / H, box[1] / W, box[2] / H, box[3] / W]], dtype=torch.float32)


# ============================================================================ hand-derived single hot cells
# A hot cell i of a map upsampled by an integer factor s (align_corners=False) has the 1-D weight 1 - |src - i| with
# src = (dst + 0.5)/s - 0.5 (clamped to [0, n-1] at the map's edges). The upsampled map is the product of the row
# and column weights; the largest column weight is 1 - 1/(2s) (e.g. 0.9375 at s=8), so a row holds a pixel above 0.1
# iff w_row > 0.1 / (1 - 1/(2s)), i.e. |src - i| < ~0.893: rows s·i - 3 ... s·i + 10 at s = 8 (both edges have margin:
# weight 0.176 at the first/last row, 0.059 just outside).
#   4×4 → 32×32, cell (1, 2): rows 5..18, columns 13..26.
#   4×4 → 32×32, cell (0, 0): rows 0..10 (dst 0..3 clamp to the cell itself), columns 0..10.
#   4×4 → 32×32, cell (3, 3): rows 21..31 (clamped at the end), columns 21..31.
#   7×7 → 224×224, cell (3, 3), s = 32 (best weight 63/64): |src - 3| < 0.8984, dst ∈ (82.75, 140.25): 83..140.
#   4×4 → 48×80, cell (1, 2): rows (s=12, best column weight 0.975) dst ∈ (6.73, 28.27): 7..28; columns (s=20,
#   best row weight 0.958) dst ∈ (31.59, 67.41): 32..67.
HAND = [
    ((4, 4), (1, 2), (32, 32), (5, 13, 18, 26)),
    ((4, 4), (0, 0), (32, 32), (0, 0, 10, 10)),
    ((4, 4), (3, 3), (32, 32), (21, 21, 31, 31)),
    ((7, 7), (3, 3), (224, 224), (83, 83, 140, 140)),
    ((4, 4), (1, 2), (48, 80), (7, 32, 28, 67)),
]


@pytest.mark.parametrize("map_size, cell, input_size, box", HAND)
def test_single_hot_cell_hand_derived(map_size, cell, input_size, box) -> None:
    f = _hot(*map_size, {cell: 1.0})
    got = boxes_from_features(f, input_size)
    assert got.dtype == torch.float32 and got.shape == (1, 4)
    torch.testing.assert_close(got, _px(box, input_size), atol=ATOL, rtol=0)
    # the same through the reference, so the reference is checked too
    np.testing.assert_allclose(_reference(f.numpy(), input_size), _px(box, input_size).numpy(), atol=ATOL, rtol=0)
    # a hot value of any size, on any background, gives the same box (min-max normalisation)
    torch.testing.assert_close(boxes_from_features(f * 37.5 - 4.0, input_size), got, atol=0, rtol=0)


@pytest.mark.parametrize("map_size, input_size", [((4, 4), (32, 32)), ((7, 7), (224, 224)), ((3, 5), (40, 72))])
def test_every_single_hot_cell_vs_reference(map_size, input_size) -> None:
    """Every cell of the map hot in turn, as one batch."""
    h, w = map_size
    f = torch.eye(h * w).view(h * w, 1, h, w)
    got = boxes_from_features(f, input_size)
    assert got.shape == (h * w, 4) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _reference(f.numpy(), input_size), atol=ATOL, rtol=0)
    assert (got >= 0).all() and (got < 1).all()
    assert (got[:, 2] > got[:, 0]).all() and (got[:, 3] > got[:, 1]).all()
    assert len({tuple(b) for b in got.tolist()}) == h * w  # each cell its own box


# ============================================================================ several blobs, threshold
def test_two_separated_blobs_box_spans_both() -> None:
    # one 7×7 hot cell alone gives rows/columns 19..76 at (1, ·) and 147..204 at (5, ·) (as 83..140 at 3 above)
    size = (224, 224)
    diag = boxes_from_features(_hot(7, 7, {(1, 1): 1.0, (5, 5): 1.0}), size)
    anti = boxes_from_features(_hot(7, 7, {(1, 5): 1.0, (5, 1): 1.0}), size)
    # weaker second blob (still above 0.1 after normalisation)
    weak = boxes_from_features(_hot(7, 7, {(1, 1): 1.0, (5, 5): 0.5}), size)
    torch.testing.assert_close(diag, _px((19, 19, 204, 204), size), atol=ATOL, rtol=0)
    torch.testing.assert_close(anti, _px((19, 19, 204, 204), size), atol=ATOL, rtol=0)
    assert weak[0, 2] > 0.8 and weak[0, 3] > 0.8  # spans the second blob as well
    # a second blob below the threshold does not count
    faint = boxes_from_features(_hot(7, 7, {(1, 1): 1.0, (5, 5): 0.09}), size)
    torch.testing.assert_close(faint, _px((19, 19, 76, 76), size), atol=ATOL, rtol=0)


def test_scattered_blobs_vs_reference() -> None:
    """Sparse random multi-channel features (many blobs), non-square maps and inputs."""
    g = torch.Generator().manual_seed(0)
    f = (torch.randn(8, 3, 6, 9, generator=g) - 1.6).clamp_min(0)
    got = boxes_from_features(f, (45, 61))
    want = _reference(f.numpy(), (45, 61))
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)
    assert (want != np.array(FULL, dtype=np.float32)).any(axis=1).all()  # no trivial full boxes in this case
    assert len({tuple(b) for b in want.tolist()}) > 4


def test_threshold_is_strict_and_configurable() -> None:
    """At the map's own size the upsampling is the identity, so the threshold can be probed exactly."""
    m = torch.zeros(1, 5, 6)
    m[0, 1, 1] = 1.0
    m[0, 3, 4] = 0.1  # not above 0.1
    m[0, 4, 0] = 0.05
    torch.testing.assert_close(boxes_from_heatmaps(m, (5, 6)), _px((1, 1, 1, 1), (5, 6)), atol=ATOL, rtol=0)
    m[0, 3, 4] = 0.11
    torch.testing.assert_close(boxes_from_heatmaps(m, (5, 6)), _px((1, 1, 3, 4), (5, 6)), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        boxes_from_heatmaps(m, (5, 6), threshold=0.04), _px((1, 0, 4, 4), (5, 6)), atol=ATOL, rtol=0
    )
    # nothing above the threshold: the full box
    torch.testing.assert_close(boxes_from_heatmaps(m, (5, 6), threshold=1.0), torch.tensor([FULL]), atol=0, rtol=0)


# ============================================================================ constant maps, channels, min-max
@pytest.mark.parametrize("value", [0.0, 3.7, -2.0])
def test_constant_map_gives_full_box(value: float) -> None:
    f = torch.full((2, 4, 7, 7), value)
    got = boxes_from_features(f, (224, 224))
    torch.testing.assert_close(got, torch.tensor([FULL, FULL]), atol=0, rtol=0)
    assert torch.equal(heatmaps_from_features(f), torch.zeros(2, 7, 7))


def test_channels_are_summed() -> None:
    size = (224, 224)
    # channels that cancel exactly: the sum is constant → full box, although each channel has structure
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 10, (1, 1, 7, 7), generator=g).float()
    cancel = torch.cat([a, 10 - a, torch.zeros_like(a)], dim=1)
    torch.testing.assert_close(boxes_from_features(cancel, size), torch.tensor([FULL]), atol=0, rtol=0)
    # a strong cell in channel 0 cancelled by channel 1: only the other cell remains
    f = _hot(7, 7, {(1, 1): 3.0, (5, 5): 1.0}, channels=2)
    f[0, 1, 1, 1] = -3.0
    torch.testing.assert_close(boxes_from_features(f, size), _px((147, 147, 204, 204), size), atol=ATOL, rtol=0)
    # cells in different channels add up: the box spans both
    f = _hot(7, 7, {(1, 1): 1.0}, channels=2)
    f[0, 1, 5, 5] = 1.0
    torch.testing.assert_close(boxes_from_features(f, size), _px((19, 19, 204, 204), size), atol=ATOL, rtol=0)
    # a cell shared by two channels outweighs one in a single channel: 0.6 + 0.6 vs 0.1 → 0.1/1.2 is below 0.1
    f = _hot(7, 7, {(1, 1): 0.6, (5, 5): 0.1}, channels=2)
    f[0, 1, 1, 1] = 0.6
    torch.testing.assert_close(boxes_from_features(f, size), _px((19, 19, 76, 76), size), atol=ATOL, rtol=0)


def test_min_max_is_per_image() -> None:
    size = (32, 32)
    base = _hot(4, 4, {(1, 2): 1.0})
    batch = torch.cat([base * 1000.0, base * 1e-3, base + 100.0, -base])
    got = boxes_from_features(batch, size)
    one = _px((5, 13, 18, 26), size)
    torch.testing.assert_close(got[:3], one.expand(3, 4), atol=ATOL, rtol=0)
    # a cold cell: every other pixel is 1 after normalisation, so the tight box is the whole image, (H-1)/H, (W-1)/W
    torch.testing.assert_close(got[3:], _px((0, 0, 31, 31), size), atol=ATOL, rtol=0)
    hm = heatmaps_from_features(batch)
    assert torch.equal(hm.amin(dim=(1, 2)), torch.zeros(4)) and torch.equal(hm.amax(dim=(1, 2)), torch.ones(4))


def test_batch_mixing_cases() -> None:
    size = (224, 224)
    cases = [
        _hot(7, 7, {(3, 3): 1.0}, channels=2),
        torch.full((1, 2, 7, 7), 5.0),  # constant
        _hot(7, 7, {(1, 5): 2.0, (5, 1): 2.0}, channels=2),  # two blobs
        _hot(7, 7, {(0, 0): 1.0}, channels=2),  # corner
        -_hot(7, 7, {(6, 6): 1.0}, channels=2),  # cold cell
    ]
    batch = torch.cat(cases)
    got = boxes_from_features(batch, size)
    want = torch.cat(
        [
            _px((83, 83, 140, 140), size),
            torch.tensor([FULL]),
            _px((19, 19, 204, 204), size),
            _px((0, 0, 44, 44), size),  # rows/columns 0 .. 32·1.398 - 0.5 = 44.25, as for 19..76 at cell 1
            _px((0, 0, 223, 223), size),
        ]
    )
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.numpy(), _reference(batch.numpy(), size), atol=ATOL, rtol=0)
    # each item as it would be alone
    for i, f in enumerate(cases):
        torch.testing.assert_close(boxes_from_features(f, size)[0], got[i], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_output_dtype_and_range(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    f = (torch.randn(5, 4, 7, 7, generator=g) - 1.0).clamp_min(0).to(dtype)
    got = boxes_from_features(f, (96, 128))
    assert got.dtype == torch.float32 and got.shape == (5, 4)
    assert (got >= 0).all() and (got < 1).all()
    assert (got[:, 0] <= got[:, 2]).all() and (got[:, 1] <= got[:, 3]).all()
    np.testing.assert_allclose(got.numpy(), _reference(f.float().numpy(), (96, 128)), atol=ATOL, rtol=0)
