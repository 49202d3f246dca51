"""ContrastiveCrop window sampler (Peng et al., CVPR 2022; the official sampler after the fix for their issue
#16): an independent scalar reference, invariants, the Beta corner statistics, RandomResizedCrop equivalence
without boxes, the fallback, and the config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from viewpipe.crop import FULL_BOX, CropConfig, CropDraws, CropSampler, draw, windows_from_draws

BELOW_ONE = float(np.nextafter(1.0, 0.0))


# --------------------------------------------------------------------------------------------------
# The scalar reference: a literal per-sample transcription of the official sampler (viewpipe.crop's docstring) with Python floats, `math`,
# Python `round` (half-to-even) and `int` (truncation). It shares nothing with viewpipe.crop.
# --------------------------------------------------------------------------------------------------


def ref_size(H: int, W: int, u_scale, u_ratio, cfg: CropConfig) -> tuple[int, int] | None:
    """The first proposal (h, w) that fits in an H×W image, or None when every try fails."""
    smin, smax = float(cfg.scale[0]), float(cfg.scale[1])
    rmin, rmax = float(cfg.ratio[0]), float(cfg.ratio[1])
    area = float(W * H)
    for us, ur in zip(u_scale, u_ratio):
        s = smin + (smax - smin) * float(us)
        r = math.exp(math.log(rmin) + (math.log(rmax) - math.log(rmin)) * float(ur))
        w = round(math.sqrt(area * s * r))
        h = round(math.sqrt(area * s / r))
        if 0 < w <= W and 0 < h <= H:
            return h, w
    return None


def ref_bounds(H: int, W: int, h: int, w: int, box) -> tuple[int, int, int, int]:
    """(top_lo, top_hi, left_lo, left_hi) for a fitting h×w crop and a normalised (h0, w0, h1, w1) box."""
    h0, w0, h1, w1 = (float(v) for v in box)

    def clamp_y(v: int) -> int:
        return min(max(v, 0), H - h)

    def clamp_x(v: int) -> int:
        return min(max(v, 0), W - w)

    return (
        clamp_y(int(H * h0) - h // 2),
        clamp_y(int(H * h1) - h // 2),
        clamp_x(int(W * w0) - w // 2),
        clamp_x(int(W * w1) - w // 2),
    )


def ref_fallback(H: int, W: int, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's centre crop."""
    in_ratio = W / H
    if in_ratio < min(ratio):
        w = W
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = H
        w = round(h * max(ratio))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def ref_window(H, W, box, u_scale, u_ratio, corner, cfg: CropConfig) -> tuple[int, int, int, int]:
    H, W = int(H), int(W)
    size = ref_size(H, W, u_scale, u_ratio, cfg)
    if size is None:
        return ref_fallback(H, W, (float(cfg.ratio[0]), float(cfg.ratio[1])))
    h, w = size
    if cfg.use_box:
        top_lo, top_hi, left_lo, left_hi = ref_bounds(H, W, h, w, box)
        i = top_lo + int((top_hi - top_lo) * float(corner[0]))
        j = left_lo + int((left_hi - left_lo) * float(corner[1]))
    else:
        i = int((H - h + 1) * float(corner[0]))
        j = int((W - w + 1) * float(corner[1]))
    return i, j, h, w


def ref_windows(sizes, boxes, d: CropDraws, cfg: CropConfig) -> np.ndarray:
    return np.array(
        [
            ref_window(sizes[n][0], sizes[n][1], boxes[n], d.scale[n], d.log_ratio[n], d.corner[n], cfg)
            for n in range(len(sizes))
        ],
        dtype=np.int64,
    ).reshape(-1, 4)


# --------------------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------------------


def random_sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) (height, width): tiny, ordinary, extreme aspect ratios and a few fixed awkward ones."""
    kind = rng.integers(0, 5, n)
    tiny = rng.integers(1, 9, (n, 2))
    ordinary = rng.integers(9, 600, (n, 2))
    thin = np.stack([rng.integers(1, 5, n), rng.integers(200, 1001, n)], axis=1)
    thin = np.where(rng.random((n, 1)) < 0.5, thin, thin[:, ::-1])
    fixed = np.array([[1, 1], [1, 500], [500, 1], [500, 3], [3, 500], [1, 1000], [1000, 1], [2, 3]])
    fixed = fixed[rng.integers(0, len(fixed), n)]
    mixed = np.stack([rng.integers(1, 1200, n), rng.integers(1, 1200, n)], axis=1)
    return np.choose(kind[:, None], [tiny, ordinary, thin, fixed, mixed]).astype(np.int64)


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) valid normalised (h0, w0, h1, w1): random, degenerate (zero size), thin, full, on the edges."""
    a, b = rng.random((n, 2)), rng.random((n, 2))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    kind = rng.integers(0, 6, (n, 1))
    lo = np.where(kind == 1, hi, lo)  # degenerate: a single line / point
    hi = np.where(kind == 2, np.minimum(lo + rng.choice([1e-9, 1e-4, 1e-2], (n, 1)), 1.0), hi)  # thin
    lo = np.where(kind == 3, 0.0, lo)  # full box
    hi = np.where(kind == 3, 1.0, hi)
    edge = rng.choice([0.0, 1.0], (n, 2))
    lo = np.where(kind == 4, np.minimum(edge, hi), lo)  # touching the image border (or a line on it)
    hi = np.where(kind == 4, np.maximum(edge, lo), hi)
    lo = np.where(kind == 5, np.round(lo, 1), lo)  # "round" coordinates: 0.1·H etc. hit float products
    hi = np.where(kind == 5, np.maximum(np.round(hi, 1), np.round(lo, 1)), hi)
    assert (lo <= hi).all() and (lo >= 0).all() and (hi <= 1).all()
    return np.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], axis=1)


def edgy_draws(rng: np.random.Generator, n: int, cfg: CropConfig) -> CropDraws:
    """The package's draws with some entries replaced by the extremes 0 and the largest double below 1."""
    d = draw(rng, n, cfg)
    special = np.array([0.0, BELOW_ONE, 0.5])

    def spice(x: np.ndarray) -> np.ndarray:
        mask = rng.random(x.shape) < 0.08
        return np.where(mask, special[rng.integers(0, 3, x.shape)], x)

    return CropDraws(spice(d.scale), spice(d.log_ratio), spice(d.corner))


CONFIGS = [
    CropConfig(),
    CropConfig(alpha=0.1, tries=1),
    CropConfig(alpha=0.3, scale=(0.08, 1.0), tries=10),
    CropConfig(alpha=1.0, tries=10),
    CropConfig(alpha=3.0, scale=(0.9, 1.0)),
    CropConfig(alpha=0.6, scale=(0.5, 0.5), ratio=(1.0, 1.0), tries=3),
    CropConfig(alpha=0.6, scale=(0.01, 0.05), ratio=(0.2, 5.0), tries=10),
    CropConfig(alpha=2.0, scale=(0.3, 0.9), ratio=(1.5, 2.5), tries=1),
    CropConfig(alpha=0.5, scale=(0.5, 2.0), ratio=(0.3, 0.6), tries=4),
    CropConfig(use_box=False),
    CropConfig(use_box=False, tries=1, scale=(0.08, 1.0)),
    CropConfig(use_box=False, scale=(0.9, 1.0), ratio=(0.5, 2.0), tries=10),
]


@pytest.mark.parametrize("k", range(len(CONFIGS)))
def test_numpy_equals_scalar_reference(k: int) -> None:
    cfg = CONFIGS[k]
    rng = np.random.default_rng(1000 + k)
    n = 1500
    sizes, boxes = random_sizes(rng, n), random_boxes(rng, n)
    d = edgy_draws(rng, n, cfg)
    expected = ref_windows(sizes, boxes, d, cfg)

    got_np = windows_from_draws(sizes, boxes, d, cfg)
    assert got_np.dtype == np.int32 and got_np.shape == (n, 4)
    bad = np.flatnonzero((got_np != expected).any(axis=1))
    assert bad.size == 0, f"numpy != reference at {bad[:5]}: {got_np[bad[:5]]} vs {expected[bad[:5]]}"

    # The cases must actually exercise both paths (and, with boxes, the clamping).
    fell_back = np.array([ref_size(*s, d.scale[i], d.log_ratio[i], cfg) is None for i, s in enumerate(sizes)])
    assert 0 < fell_back.sum() < n


def test_reference_agrees_on_float32_boxes_and_int32_sizes() -> None:
    cfg = CropConfig(alpha=0.4)
    rng = np.random.default_rng(7)
    sizes, boxes = random_sizes(rng, 2000).astype(np.int32), random_boxes(rng, 2000).astype(np.float32)
    d = draw(rng, 2000, cfg)
    expected = ref_windows(sizes, boxes, d, cfg)
    np.testing.assert_array_equal(windows_from_draws(sizes, boxes, d, cfg), expected)


@pytest.mark.parametrize("side, expected", [(5, 2), (7, 4), (9, 4), (11, 6)])
@pytest.mark.parametrize("impl", [windows_from_draws, ref_windows])
def test_size_rounds_half_to_even(impl, side: int, expected: int) -> None:
    # side² · 0.25 with ratio 1 → sqrt = side/2 = x.5 exactly: 2.5→2, 3.5→4, 4.5→4, 5.5→6.
    cfg = CropConfig(scale=(0.25, 0.25), ratio=(1.0, 1.0), tries=1, use_box=False)
    d = CropDraws(np.array([[0.3]]), np.array([[0.7]]), np.array([[0.0, 0.0]]))
    out = impl(np.array([[side, side]]), np.array([[0.0, 0.0, 1.0, 1.0]]), d, cfg)
    assert out[0, 2] == expected and out[0, 3] == expected


@pytest.mark.parametrize("impl", [windows_from_draws, ref_windows])
def test_hand_computed_windows(impl) -> None:
    """A few windows worked out by hand from the pseudo-code (rows vs columns, clamping, corner extremes)."""
    cfg = CropConfig(scale=(0.25, 0.25), ratio=(1.0, 1.0), tries=2)  # 200×200 crops of a 400×400 image
    sizes = np.array([[400, 400]] * 4 + [[400, 600]])
    boxes = np.array(
        [
            [0.3, 0.3, 0.7, 0.7],  # top ∈ [120-100, 280-100] = [20, 180]
            [0.3, 0.3, 0.7, 0.7],
            [0.0, 0.9, 0.1, 1.0],  # top: [clamp(-100), clamp(-60)] = [0, 0]; left: [clamp(260)=200, 200]
            [0.5, 0.25, 0.5, 0.75],  # top: [100, 100]; left: [0, 200]
            [0.3, 0.3, 0.7, 0.7],  # 400×600: area 240000·0.25 → sqrt(60000)=244.9 → 245×245
        ]
    )
    corner = np.array([[0.0, BELOW_ONE], [0.5, 0.25], [0.9, 0.9], [0.0, 0.999], [0.5, 0.5]])
    d = CropDraws(np.zeros((5, 2)), np.zeros((5, 2)), corner)
    out = impl(sizes, boxes, d, cfg)
    # last row: h=w=245, top: [clamp(120-122), clamp(280-122)] = [0, 155] → 0 + int(155·0.5) = 77;
    #           left: [clamp(180-122), clamp(420-122)] = [58, min(298, 355)] = [58, 298] → 58 + 120 = 178
    np.testing.assert_array_equal(
        out,
        [[20, 179, 200, 200], [100, 60, 200, 200], [0, 200, 200, 200], [100, 199, 200, 200], [77, 178, 245, 245]],
    )


# --------------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        CropConfig(),
        CropConfig(alpha=0.1, scale=(0.08, 1.0), tries=1),
        CropConfig(alpha=5.0, scale=(0.9, 1.5), ratio=(0.5, 2.0)),
        CropConfig(scale=(0.01, 0.02), ratio=(1 / 3, 3.0)),
        CropConfig(use_box=False),
        CropConfig(use_box=False, scale=(0.5, 1.0), ratio=(1.0, 1.0), tries=1),
    ],
)
def test_crop_is_inside_the_image(cfg: CropConfig) -> None:
    rng = np.random.default_rng(11)
    n = 20000
    sizes, boxes = random_sizes(rng, n), random_boxes(rng, n)
    sampler = CropSampler(cfg, seed=3)
    for out in (sampler(sizes, boxes), windows_from_draws(sizes, boxes, edgy_draws(rng, n, cfg), cfg)):
        top, left, h, w = out.T.astype(np.int64)
        H, W = sizes.T
        assert (h >= 1).all() and (w >= 1).all()
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= H).all() and (left + w <= W).all()


def test_corner_lies_between_the_clamped_box_bounds() -> None:
    cfg = CropConfig(alpha=0.3, scale=(0.08, 1.0))
    rng = np.random.default_rng(12)
    n = 20000
    sizes, boxes = random_sizes(rng, n), random_boxes(rng, n)
    d = edgy_draws(rng, n, cfg)
    out = windows_from_draws(sizes, boxes, d, cfg)
    np.testing.assert_array_equal(out, ref_windows(sizes, boxes, d, cfg))
    checked = strict = 0
    for i in range(n):
        H, W = (int(v) for v in sizes[i])
        size = ref_size(H, W, d.scale[i], d.log_ratio[i], cfg)
        if size is None:
            continue
        top, left, h, w = (int(v) for v in out[i])
        assert (h, w) == size
        top_lo, top_hi, left_lo, left_hi = ref_bounds(H, W, h, w, boxes[i])
        assert top_lo <= top <= top_hi and left_lo <= left <= left_hi, (i, out[i], sizes[i], boxes[i])
        # The corner draw is < 1, so the upper bound is only reached when the range is empty.
        assert top < top_hi or top == top_lo == top_hi
        assert left < left_hi or left == left_lo == left_hi
        checked += 1
        strict += top_hi > top_lo and left_hi > left_lo
    assert checked > n // 2 and strict > n // 10


# --------------------------------------------------------------------------------------------------
# Statistics of the corner: Beta(α, α), independent per axis
# --------------------------------------------------------------------------------------------------


def beta_cdf(x: float, a: float) -> float:
    """CDF of Beta(a, a), by Simpson's rule after t = u^(1/a) (which removes the singularity at 0)."""
    if x > 0.5:
        return 1.0 - beta_cdf(1.0 - x, a)
    if x <= 0:
        return 0.0
    u = np.linspace(0.0, x**a, 4001)
    f = (1.0 - u ** (1.0 / a)) ** (a - 1.0)
    integral = (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    log_beta = 2 * math.lgamma(a) - math.lgamma(2 * a)
    return integral / a / math.exp(log_beta)


# chi-square 0.999 quantile with 9 degrees of freedom
CHI2_9_999 = 27.877


def _fixed_size_corners(alpha: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised corners for 200×200 crops of a 400×400 image and box (0.3, 0.2, 0.7, 0.9):
    top ∈ [20, 180] (160 positions), left ∈ [0, 200] (clamped; 200 positions). Offsets are returned in
    units of 1/10 of the range (top offset / 16, left / 20) so that `np.floor` gives exact decile bins."""
    cfg = CropConfig(alpha=alpha, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    out = CropSampler(cfg, seed=seed)(np.tile([400, 400], (n, 1)), np.tile([0.3, 0.2, 0.7, 0.9], (n, 1)))
    assert (out[:, 2:] == 200).all()
    top, left = out[:, 0].astype(np.int64), out[:, 1].astype(np.int64)
    assert top.min() >= 20 and top.max() <= 179 and left.min() >= 0 and left.max() <= 199
    return (top - 20) / 16, left / 20


def _decile_counts(x: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.floor(x).astype(np.int64), minlength=10)
    assert len(counts) == 10
    return counts


@pytest.mark.parametrize("alpha", [0.1, 0.3, 1.0, 2.5])
def test_corner_follows_beta(alpha: float) -> None:
    """Ten equal bins of the normalised corner hold whole sets of pixel positions (16 and 20), so the
    bin probabilities are exactly the Beta(α, α) ones: chi-square goodness of fit per axis."""
    n = 20000
    p = np.diff([beta_cdf(k / 10, alpha) for k in range(11)])
    assert abs(p.sum() - 1) < 1e-9 and abs(beta_cdf(0.5, alpha) - 0.5) < 1e-5
    for axis in _fixed_size_corners(alpha, n, seed=21):
        counts = _decile_counts(axis)
        chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
        assert chi2 < CHI2_9_999, (alpha, counts, n * p)


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_corner_histogram_is_u_shaped_for_small_alpha(alpha: float) -> None:
    n = 20000
    for axis in _fixed_size_corners(alpha, n, seed=22):
        counts = _decile_counts(axis)
        middle = counts[3:7].max()
        assert counts[0] > 3 * middle and counts[-1] > 3 * middle, counts
        assert counts[0] + counts[-1] > 0.4 * n, counts
        # monotone decrease towards the middle (allowing no noise reversal at these margins)
        assert counts[0] > counts[1] > counts[2] and counts[-1] > counts[-2] > counts[-3], counts


def test_corner_histogram_is_flat_for_alpha_one() -> None:
    n = 20000
    for axis in _fixed_size_corners(1.0, n, seed=23):
        counts = _decile_counts(axis)
        assert counts.max() < 1.12 * n / 10 and counts.min() > 0.88 * n / 10, counts


def test_u_shape_with_random_sizes_and_default_scale() -> None:
    """The realistic case: random proposal sizes, α = 0.3; the outer fifths of the clamped range get far more
    corners than the middle fifth."""
    cfg = CropConfig(alpha=0.3)
    n = 20000
    sizes, boxes = np.tile([480, 640], (n, 1)), np.tile([0.25, 0.2, 0.75, 0.8], (n, 1))
    out = CropSampler(cfg, seed=24)(sizes, boxes).astype(np.int64)
    pos = []
    for axis, S, (b0, b1) in ((0, 480, (0.25, 0.75)), (1, 640, (0.2, 0.8))):
        c = out[:, 2 + axis]
        lo = np.clip(int(S * b0) - c // 2, 0, S - c)
        hi = np.clip(int(S * b1) - c // 2, 0, S - c)
        keep = hi - lo >= 40
        pos.append(np.where(keep, (out[:, axis] - lo) / np.maximum(hi - lo, 1), np.nan))
        counts = np.histogram(pos[-1][keep], bins=5, range=(0, 1))[0]
        assert keep.sum() > n // 3
        assert counts[0] > 2.5 * counts[2] and counts[-1] > 2.5 * counts[2], counts


def test_row_and_column_draws_are_independent() -> None:
    n = 20000
    top, left = _fixed_size_corners(0.3, n, seed=25)
    assert abs(np.corrcoef(top, left)[0, 1]) < 0.03
    top, left = top / 10, left / 10
    # U-shaped marginals: a shared draw would put most mass in the (low, low) and (high, high) cells
    low_low = np.mean((top < 0.5) & (left < 0.5))
    expected = np.mean(top < 0.5) * np.mean(left < 0.5)
    assert abs(low_low - expected) < 0.015
    # and extreme corners on both axes at once happen about as often as the product says
    both_edge = np.mean(((top < 0.1) | (top >= 0.9)) & ((left < 0.1) | (left >= 0.9)))
    assert abs(both_edge - np.mean((top < 0.1) | (top >= 0.9)) * np.mean((left < 0.1) | (left >= 0.9))) < 0.015


def test_draws_have_the_documented_shapes_and_ranges() -> None:
    rng = np.random.default_rng(26)
    d = draw(rng, 5000, CropConfig(alpha=0.05, tries=7))
    assert d.scale.shape == d.log_ratio.shape == (5000, 7) and d.corner.shape == (5000, 2)
    for x in d:
        assert x.dtype == np.float64 and (x >= 0).all() and (x < 1).all()
    # α = 0.05: the Beta piles up at both ends
    assert np.mean((d.corner < 0.01) | (d.corner > 0.99)) > 0.6
    d = draw(rng, 5000, CropConfig(use_box=False))
    assert abs(np.mean(d.corner < 0.1) - 0.1) < 0.015 and abs(np.mean(d.corner > 0.9) - 0.1) < 0.015


# --------------------------------------------------------------------------------------------------
# use_box=False is RandomResizedCrop
# --------------------------------------------------------------------------------------------------


def ks_stat(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b|."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_critical(n: int, m: int, level: float = 1e-3) -> float:
    return math.sqrt(-math.log(level / 2) / 2) * math.sqrt((n + m) / (n * m))


def torchvision_windows(H: int, W: int, scale, ratio, n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    img = torch.empty(3, H, W)
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=np.int64)


def _stats(out: np.ndarray, H: int, W: int) -> dict[str, np.ndarray]:
    top, left, h, w = out.T.astype(np.int64)
    return {"h": h, "w": w, "area": h * w / (H * W), "top": top, "left": left, "centre_y": top + h / 2}


@pytest.mark.parametrize("H, W", [(180, 240), (100, 300), (64, 48)])
def test_no_box_matches_torchvision_random_resized_crop(H: int, W: int) -> None:
    n = 12000
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    ours = CropSampler(CropConfig(scale=scale, ratio=ratio, use_box=False), seed=31)(np.tile([H, W], (n, 1)))
    theirs = torchvision_windows(H, W, scale, ratio, n, seed=31)
    crit = ks_critical(n, n)
    a, b = _stats(ours, H, W), _stats(theirs, H, W)
    for key in a:
        assert ks_stat(a[key], b[key]) < crit, (key, ks_stat(a[key], b[key]), crit)
    # the full range of positions is reached, the last one included (torch.randint(0, H - h + 1))
    assert ((ours[:, 0] == H - ours[:, 2]) & (ours[:, 2] < H)).any()

    # The test has power: a different scale range, or box-driven U-shaped positions, are detected.
    other = CropSampler(CropConfig(scale=(0.3, 1.0), ratio=ratio, use_box=False), seed=31)(np.tile([H, W], (n, 1)))
    assert ks_stat(_stats(other, H, W)["area"], b["area"]) > 2 * crit
    ushape = CropSampler(CropConfig(alpha=0.2, scale=scale, ratio=ratio), seed=31)(np.tile([H, W], (n, 1)))
    assert ks_stat(_stats(ushape, H, W)["centre_y"], b["centre_y"]) > 2 * crit


def test_full_box_alpha_one_has_random_resized_crop_sizes() -> None:
    H, W, n = 180, 240, 12000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = CropSampler(CropConfig(alpha=1.0, scale=scale, ratio=ratio), seed=32)(
        np.tile([H, W], (n, 1)), np.tile([0.0, 0.0, 1.0, 1.0], (n, 1))
    )
    theirs = torchvision_windows(H, W, scale, ratio, n, seed=32)
    crit = ks_critical(n, n)
    a, b = _stats(ours, H, W), _stats(theirs, H, W)
    for key in ("h", "w", "area"):
        assert ks_stat(a[key], b[key]) < crit, (key, ks_stat(a[key], b[key]), crit)
    # the full box spans every position: the corner is spread over the whole free range
    top, h = ours[:, 0].astype(np.int64), ours[:, 2].astype(np.int64)
    free = H - h > 20
    rel = top[free] / (H - h[free])
    assert rel.min() < 0.02 and rel.max() > 0.95 and abs(rel.mean() - 0.5) < 0.03


# --------------------------------------------------------------------------------------------------
# Fallback
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "H, W, ratio, expected",
    [
        (1000, 1, (3 / 4, 4 / 3), (499, 0, 1, 1)),  # too tall: w = W, h = round(1 / 0.75) = 1
        (1, 1000, (3 / 4, 4 / 3), (0, 499, 1, 1)),  # too wide: h = H, w = round(4/3) = 1
        (1000, 30, (3 / 4, 4 / 3), (480, 0, 40, 30)),  # h = round(30 / 0.75) = 40
        (30, 1000, (3 / 4, 4 / 3), (0, 480, 30, 40)),  # w = round(30 · 4/3) = 40
        (3, 100, (2 / 3, 1.5), (0, 48, 3, 4)),  # w = round(4.5) = 4 (half to even)
        (500, 3, (3 / 4, 4 / 3), (248, 0, 4, 3)),  # h = round(3 / 0.75) = 4
    ],
)
@pytest.mark.parametrize("use_box", [True, False])
def test_fallback_is_torchvision_centre_crop(H: int, W: int, ratio, expected, use_box: bool) -> None:
    cfg = CropConfig(alpha=0.5, scale=(0.9, 1.0), ratio=ratio, use_box=use_box)
    n = 200
    rng = np.random.default_rng(41)
    boxes = random_boxes(rng, n)
    sizes = np.tile([H, W], (n, 1))
    d = draw(rng, n, cfg)
    assert all(ref_size(H, W, d.scale[i], d.log_ratio[i], cfg) is None for i in range(n))  # really falls back
    for out in (CropSampler(cfg, seed=5)(sizes, boxes), windows_from_draws(sizes, boxes, d, cfg),
                ref_windows(sizes, boxes, d, cfg)):
        assert (out == np.array(expected)).all(), out[:3]
    # torchvision's get_params is deterministic here (all ten proposals fail) and agrees
    assert tuple(RandomResizedCrop.get_params(torch.empty(3, H, W), [0.9, 1.0], list(ratio))) == expected


@pytest.mark.parametrize("impl", [windows_from_draws])  # (the scalar reference is torchvision's, 0 included)
def test_fallback_never_gives_an_empty_crop(impl) -> None:
    """Where torchvision's fallback rounds a side to 0 (a 1-px image side, a ratio range far from it), the
    window keeps one pixel: a crop-resize of nothing would fail or fill the view with zeros."""
    cfg = CropConfig(scale=(0.9, 1.0), ratio=(3.0, 4.0))
    sizes = np.array([[1000, 1], [1, 1]])
    assert RandomResizedCrop.get_params(torch.empty(3, 1000, 1), [0.9, 1.0], [3.0, 4.0])[2] == 0  # h = 0
    out = impl(sizes, np.tile(FULL_BOX, (2, 1)), draw(np.random.default_rng(0), 2, cfg), cfg)
    assert out.tolist() == [[499, 0, 1, 1], [0, 0, 1, 1]]
    cfg = CropConfig(scale=(0.9, 1.0), ratio=(0.25, 1 / 3))
    out = impl(np.array([[1, 1000]]), np.tile(FULL_BOX, (1, 1)), draw(np.random.default_rng(0), 1, cfg), cfg)
    assert out.tolist() == [[0, 499, 1, 1]]


@pytest.mark.parametrize("impl", [windows_from_draws, ref_windows])
def test_fallback_whole_image_when_ratio_fits_but_no_proposal_does(impl) -> None:
    # square image, ratio range around 1, scale 1: a proposal with r far from 1 overflows one side
    cfg = CropConfig(scale=(1.0, 1.0), ratio=(0.5, 2.0), tries=2)
    d = CropDraws(np.zeros((2, 2)), np.array([[0.9, 0.1], [0.9, 0.5]]), np.full((2, 2), 0.5))
    out = impl(np.array([[100, 100], [100, 100]]), np.array([[0.1, 0.1, 0.2, 0.2]] * 2), d, cfg)
    # row 0: both tries overflow → fallback, the whole image; row 1: the second try has r = 1 (up to
    # rounding) → 100×100 through the box path: top ∈ [clamp(10 - 50), clamp(20 - 50)] = [0, 0]
    np.testing.assert_array_equal(out, [[0, 0, 100, 100], [0, 0, 100, 100]])
    # the first proposal that fits is taken even when a later one would fit too:
    # r = exp(log 0.5 + 0.9·log 4) = 1.741 → w = round(sqrt(2500·1.741)) = 66, h = round(sqrt(2500/1.741)) = 38;
    # box (0.9, 0.9, 1, 1): top ∈ [clamp(90 - 19), clamp(100 - 19)] = [62, 62],
    #                       left ∈ [clamp(90 - 33), clamp(100 - 33)] = [34, 34]
    d = CropDraws(np.array([[0.0, 0.0]]), np.array([[0.9, 0.5]]), np.array([[0.0, 0.0]]))
    cfg = CropConfig(scale=(0.25, 0.25), ratio=(0.5, 2.0), tries=2)
    out = impl(np.array([[100, 100]]), np.array([[0.9, 0.9, 1.0, 1.0]]), d, cfg)
    assert tuple(out[0]) == (62, 34, 38, 66)


# --------------------------------------------------------------------------------------------------
# CropSampler and CropConfig
# --------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(51)
    sizes, boxes = random_sizes(rng, 500), random_boxes(rng, 500)
    for cfg in (CropConfig(), CropConfig(use_box=False)):
        a, b, c = CropSampler(cfg, seed=7), CropSampler(cfg, seed=7), CropSampler(cfg, seed=8)
        first_a, first_b, first_c = a(sizes, boxes), b(sizes, boxes), c(sizes, boxes)
        np.testing.assert_array_equal(first_a, first_b)
        np.testing.assert_array_equal(a(sizes, boxes), b(sizes, boxes))  # the streams stay in step
        assert (first_a != first_c).any(axis=1).mean() > 0.3  # (tiny images have few windows)
        assert (a(sizes, boxes) != first_a).any(axis=1).mean() > 0.3  # the state advances
        ss = np.random.SeedSequence(99)
        np.testing.assert_array_equal(CropSampler(cfg, seed=ss)(sizes, boxes), CropSampler(cfg, seed=ss)(sizes, boxes))


def test_sampler_default_box_is_full_image() -> None:
    cfg = CropConfig(alpha=0.3)
    sizes = np.tile([120, 90], (1000, 1))
    np.testing.assert_array_equal(
        CropSampler(cfg, seed=4)(sizes), CropSampler(cfg, seed=4)(sizes, np.tile([0.0, 0.0, 1.0, 1.0], (1000, 1)))
    )
    # a single (H, W) pair is accepted too
    assert CropSampler(cfg, seed=4)(np.array([120, 90])).shape == (1, 4)


def test_sampler_equals_draw_then_windows() -> None:
    cfg = CropConfig(alpha=0.7)
    rng = np.random.default_rng(52)
    sizes, boxes = random_sizes(rng, 300), random_boxes(rng, 300)
    expected = ref_windows(sizes, boxes, draw(np.random.default_rng(9), 300, cfg), cfg)
    np.testing.assert_array_equal(CropSampler(cfg, seed=9)(sizes, boxes), expected)


@pytest.mark.parametrize(
    "kw",
    [
        {"alpha": 0.0},
        {"alpha": -1.0},
        {"alpha": float("nan")},
        {"scale": (0.0, 1.0)},
        {"scale": (-0.1, 1.0)},
        {"scale": (0.8, 0.2)},
        {"scale": (float("nan"), 1.0)},
        {"ratio": (0.0, 1.0)},
        {"ratio": (-1.0, 1.0)},
        {"ratio": (4 / 3, 3 / 4)},
        {"ratio": (0.5, float("nan"))},
        {"tries": 0},
        {"tries": -3},
    ],
)
def test_config_rejects_invalid_values(kw) -> None:
    with pytest.raises(ValueError):
        CropConfig(**kw)


@pytest.mark.parametrize(
    "kw", [{"alpha": 1e-3}, {"scale": (0.5, 0.5)}, {"ratio": (1.0, 1.0)}, {"tries": 1}, {"scale": (0.5, 2.0)}]
)
def test_config_accepts_edge_values(kw) -> None:
    CropConfig(**kw)
