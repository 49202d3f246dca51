"""The batched torch augmenter (viewpipe.augment) against torchvision's functional ops, op by op and end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as tnf
import torchvision.transforms.functional as F1
import torchvision.transforms.v2.functional as F

from conftest import view_params
from viewpipe import augment as A
from viewpipe.augment import AugmentConfig, Augmenter, ViewAugment, ViewParams, draw_params, photometric, preset

# Photometric ops on float images in [0, 1] are the same formulas as torchvision's, evaluated in float32 in a
# slightly different order (torchvision v2 fuses the grayscale weights with add_(alpha=...), the blur uses two 1-D
# convolutions instead of one 2-D one): measured differences are <= 1.2e-6, so 1e-5 is float32 rounding slack.
PHOTO_ATOL = 1e-5
# crop_resize works on [0, 255] floats. Where it must agree with another bilinear sampler exactly (same sample
# points), the only difference is float32 rounding of the coordinates and weights: measured <= 6.1e-5 grey levels.
CROP_EXACT_ATOL = 1e-3

NO_AUG = ViewAugment(flip=0.0, jitter_p=0.0, grayscale=0.0, blur=0.0, solarize=0.0)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _smooth(n: int, H: int, W: int, seed: int, cells: int = 5) -> torch.Tensor:
    """Low-frequency random images in [0, 255] float: bicubic interpolation of a cells×cells random grid."""
    grid = _rand(n, 3, cells, cells, seed=seed) * 255
    return tnf.interpolate(grid, size=(H, W), mode="bicubic", align_corners=True).clamp(0, 255)


def _params(n: int, **kw: torch.Tensor) -> ViewParams:
    """Hand-made ViewParams: everything off (identity) unless given."""
    return view_params(n, **kw)


# ============================================================================ single photometric ops
FACTORS = torch.tensor([0.0, 0.2, 0.6, 1.0, 1.3, 1.8, 2.5])
HUES = torch.tensor([-0.5, -0.31, -0.05, 0.0, 0.1, 0.37, 0.5])


@pytest.mark.parametrize(
    "ours, theirs, factors",
    [
        (A.adjust_brightness, F.adjust_brightness, FACTORS),
        (A.adjust_contrast, F.adjust_contrast, FACTORS),
        (A.adjust_saturation, F.adjust_saturation, FACTORS),
        (A.adjust_hue, F.adjust_hue, HUES),
        # the v1 functional API too (its hue is the exact same HSV round trip)
        (A.adjust_contrast, F1.adjust_contrast, FACTORS),
        (A.adjust_hue, F1.adjust_hue, HUES),
    ],
    ids=["brightness", "contrast", "saturation", "hue", "contrast-v1", "hue-v1"],
)
def test_jitter_ops_match_torchvision_per_sample(ours, theirs, factors) -> None:
    x = _rand(len(factors), 3, 13, 17, seed=1)
    # a few gray and saturated pixels to hit the special cases of the HSV conversion
    x[:, :, 0, :4] = x[:, :1, 0, :4]
    x[:, :, 1, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[:, :, 1, 1] = torch.tensor([0.0, 1.0, 1.0])
    got = ours(x.clone(), factors)
    want = torch.stack([theirs(x[i], float(factors[i])) for i in range(len(factors))])
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=PHOTO_ATOL, rtol=0)
    # per sample: a batch op with one shared factor would not pass this
    assert not torch.allclose(got[1], got[-1])


def test_grayscale_matches_rgb_to_grayscale() -> None:
    x = _rand(4, 3, 11, 9, seed=2)
    torch.testing.assert_close(A.grayscale(x), F.rgb_to_grayscale(x, num_output_channels=1), atol=PHOTO_ATOL, rtol=0)
    # through photometric: samples 0 and 2 turn gray (3 channels), 1 and 3 are untouched
    gray = torch.tensor([True, False, True, False])
    got = photometric(x.clone(), _params(4, gray=gray), NO_AUG, 3)
    want = torch.where(gray.view(-1, 1, 1, 1), F.rgb_to_grayscale(x, num_output_channels=3), x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=PHOTO_ATOL, rtol=0)


@pytest.mark.parametrize("threshold", [0.5, 0.4])
def test_solarize_matches_torchvision(threshold: float) -> None:
    x = _rand(4, 3, 10, 10, seed=3)
    x[:, :, 0, 0] = threshold  # exactly at the threshold: inverted (>=), as torchvision
    sol = torch.tensor([False, True, True, False])
    got = photometric(x.clone(), _params(4, solarize=sol), replace(NO_AUG, solarize_threshold=threshold), 3)
    want = torch.where(sol.view(-1, 1, 1, 1), F.solarize(x, threshold), x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got, x)


def test_flip_matches_hflip() -> None:
    x = _rand(4, 3, 6, 9, seed=4)
    flip = torch.tensor([True, False, False, True])
    got = photometric(x.clone(), _params(4, flip=flip), NO_AUG, 3)
    want = torch.where(flip.view(-1, 1, 1, 1), F.hflip(x), x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("k", [3, 5, 9, 23])
def test_gaussian_blur_matches_torchvision_per_sample_sigma(k: int) -> None:
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 3.0])
    x = _rand(len(sigmas), 3, 30, 26, seed=5)
    got = A.gaussian_blur(x, sigmas, k)
    want = torch.stack([F.gaussian_blur(x[i], [k, k], [float(s), float(s)]) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(got, want, atol=PHOTO_ATOL, rtol=0)
    # through photometric, with a mask
    blur = torch.tensor([True, False, True, True, False, True])
    got = photometric(x.clone(), _params(6, blur=blur, sigma=sigmas), NO_AUG, k)
    torch.testing.assert_close(got, torch.where(blur.view(-1, 1, 1, 1), want, x), atol=PHOTO_ATOL, rtol=0)


def test_normalisation_matches_normalize() -> None:
    """No augmentation and a window of the whole image at its own size: the output is F.normalize(image / 255)."""
    images = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    cfg = AugmentConfig(size=20, views=(NO_AUG,), mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.7))
    (out,) = Augmenter(cfg)(images, generator=torch.Generator().manual_seed(0))
    want = F.normalize(images.float() / 255, mean=list(cfg.mean), std=list(cfg.std))
    torch.testing.assert_close(out, want, atol=PHOTO_ATOL, rtol=0)


# ============================================================================ jitter in a random order per sample
def _tv_jitter(img: torch.Tensor, order: list[int], f: torch.Tensor) -> torch.Tensor:
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for op in order:
        img = ops[op](img, float(f[op]))
    return img


def test_jitter_random_order_per_sample_matches_torchvision() -> None:
    orders = torch.tensor(
        [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2], [1, 2, 3, 0], [0, 1, 2, 3]]
    )
    factors = torch.tensor(
        [
            [1.3, 0.6, 1.4, 0.1],
            [1.3, 0.6, 1.4, 0.1],  # same factors, other order: must differ from sample 0
            [0.7, 1.35, 0.65, -0.08],
            [1.1, 0.7, 1.3, 0.09],
            [0.6, 1.4, 0.6, -0.1],
            [1.4, 1.2, 0.8, 0.05],
            [0.5, 1.4, 1.4, 0.1],  # jitter off for this one: untouched
        ]
    )
    jitter = torch.tensor([True] * 6 + [False])
    x = _rand(7, 3, 12, 14, seed=7)
    x[1] = x[0]
    cfg = replace(NO_AUG, jitter=(0.4, 0.4, 0.4, 0.1))  # jitter_p = 0 in cfg: the mask in the params decides
    got = photometric(x.clone(), _params(7, jitter=jitter, factors=factors, order=orders), cfg, 3)
    for i in range(7):
        want = _tv_jitter(x[i], orders[i].tolist(), factors[i]) if jitter[i] else x[i]
        torch.testing.assert_close(got[i], want, atol=PHOTO_ATOL, rtol=0, msg=f"sample {i}")
    # the order matters (so the test above checks it): same image and factors, different order
    assert (got[0] - got[1]).abs().max() > 1e-2


def test_photometric_with_drawn_params_matches_torchvision() -> None:
    """draw_params then photometric: every sample equals torchvision's flip, jitter (in its order), gray, blur,
    solarize applied in that sequence with that sample's parameters."""
    cfg = ViewAugment(flip=0.5, jitter_p=0.8, grayscale=0.3, blur=0.5, solarize=0.3)
    n, k = 24, 5
    p = draw_params(cfg, n, torch.Generator().manual_seed(11))
    x = _rand(n, 3, 16, 16, seed=8)
    got = photometric(x.clone(), p, cfg, k)
    for i in range(n):
        y = x[i]
        if p.flip[i]:
            y = F.hflip(y)
        if p.jitter[i]:
            y = _tv_jitter(y, p.order[i].tolist(), p.factors[i])
        if p.gray[i]:
            y = F.rgb_to_grayscale(y, num_output_channels=3)
        if p.blur[i]:
            y = F.gaussian_blur(y, [k, k], [float(p.sigma[i])] * 2)
        if p.solarize[i]:
            y = F.solarize(y, cfg.solarize_threshold)
        torch.testing.assert_close(got[i], y, atol=PHOTO_ATOL, rtol=0, msg=f"sample {i}")
    for mask in (p.flip, p.jitter, p.gray, p.blur, p.solarize):  # the draw exercised both branches of every op
        assert 0 < int(mask.sum()) < n


# ============================================================================ crop and resize
def _roi_reference(x: torch.Tensor, window: tuple[int, int, int, int], S: int) -> torch.Tensor:
    """What crop_resize should compute, written independently with grid_sample on the whole image: output pixel
    (p, q) is the mean of ceil(h/S) × ceil(w/S) bilinear samples spread evenly over its footprint
    [top + p·h/S, top + (p+1)·h/S) (pixel centres at integer + 0.5 in corner coordinates)."""
    top, left, h, w = window
    _, _, H, W = x.shape
    gh, gw = math.ceil(h / S), math.ceil(w / S)
    ys = top + (torch.arange(S * gh, dtype=torch.float64) + 0.5) * h / (S * gh) - 0.5  # pixel-centre coordinates
    xs = left + (torch.arange(S * gw, dtype=torch.float64) + 0.5) * w / (S * gw) - 0.5
    gy, gx = torch.meshgrid(ys / (H - 1) * 2 - 1, xs / (W - 1) * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].float()
    s = tnf.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return s.view(x.shape[0], 3, S, gh, S, gw).mean(dim=(3, 5))


def _inside(h: int, S: int) -> torch.Tensor:
    """Output rows whose bilinear sample (upsampling) stays inside the window: there resized_crop (which clamps at
    the crop's edge) and roi_align (which reads the pixels next to the window) agree."""
    src = (torch.arange(S, dtype=torch.float64) + 0.5) * h / S - 0.5
    return (src >= 0) & (src <= h - 1)


def _random_windows(n: int, lo: int, hi: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randint(lo, hi + 1, (n,), generator=g), torch.randint(lo, hi + 1, (n,), generator=g)
    top = (torch.rand(n, generator=g) * (size - h + 1)).long()
    left = (torch.rand(n, generator=g) * (size - w + 1)).long()
    return torch.stack([top, left, h, w], dim=1)


# Upsampling (window smaller than S): F.resized_crop (antialias=True does nothing when enlarging) is bilinear on
# the cropped image, roi_align bilinear on the whole image at the same points. They agree to float rounding (checked
# with CROP_EXACT_ATOL) except in the first/last ~S/(2h) output rows and columns, where resized_crop clamps to the
# crop's edge pixel and roi_align interpolates with the pixel just outside the window (the more faithful value).
# On these smooth 64×64 images (S=24, 24 windows of 6..23 px) that edge band gives, measured: worst per-window
# mean |err| 0.31, max |err| 6.1 grey levels (of 255); the tolerances leave ~30 % headroom.
UP_MEAN_TOL, UP_MAX_TOL = 0.4, 8.0
# Downsampling (window larger than S): roi_align averages ceil(h/S)×ceil(w/S) bilinear samples over each output
# pixel's footprint (a box filter); resized_crop with antialias uses a triangle filter with support ±scale, and
# clamps at the crop's edges. Measured on the same kind of smooth images (24 windows of 25..64 px): worst
# per-window mean |err| 0.48, max |err| 5.1 grey levels; the tolerances leave ~30 % headroom.
DOWN_MEAN_TOL, DOWN_MAX_TOL = 0.6, 7.0


@pytest.mark.parametrize("kind", ["up", "down"])
def test_crop_resize_vs_resized_crop(kind: str) -> None:
    S, size, n = 24, 64, 8
    worst_mean = worst_max = 0.0
    for seed in range(3):
        x = _smooth(n, size, size, seed)
        windows = _random_windows(n, 6, S - 1, size, 100 + seed) if kind == "up" else _random_windows(
            n, S + 1, size, size, 200 + seed
        )
        if seed == 0:  # include the whole image, and windows touching each border
            windows[0] = torch.tensor([0, 0, size, size] if kind == "down" else [0, 0, 16, 20])
            windows[1] = torch.tensor([size - windows[1, 2], size - windows[1, 3], windows[1, 2], windows[1, 3]])
        got = A.crop_resize(x, windows.view(n, 1, 4), S)
        assert got.shape == (n, 3, S, S)
        for i, (top, left, h, w) in enumerate(windows.tolist()):
            want = F.resized_crop(x[i], top, left, h, w, [S, S], antialias=True)
            err = (got[i] - want).abs()
            worst_mean, worst_max = max(worst_mean, err.mean().item()), max(worst_max, err.max().item())
            # independently of torchvision: the documented roi_align semantics, exactly
            torch.testing.assert_close(got[i : i + 1], _roi_reference(x[i : i + 1], (top, left, h, w), S),
                                       atol=CROP_EXACT_ATOL, rtol=0)
            if kind == "up":
                inside = _inside(h, S)[:, None] & _inside(w, S)[None, :]
                assert err[:, inside].max() <= CROP_EXACT_ATOL, (top, left, h, w)
    if kind == "up":
        assert worst_mean <= UP_MEAN_TOL and worst_max <= UP_MAX_TOL, (worst_mean, worst_max)
    else:
        assert worst_mean <= DOWN_MEAN_TOL and worst_max <= DOWN_MAX_TOL, (worst_mean, worst_max)
        assert worst_max > CROP_EXACT_ATOL  # a different filter indeed (guards the measurement itself)


def test_crop_resize_whole_image_upsampled_matches_resize() -> None:
    """A window of the whole image has no outside pixels: upsampling equals plain bilinear resize everywhere."""
    x = _smooth(2, 16, 12, seed=4)
    got = A.crop_resize(x, torch.tensor([[[0, 0, 16, 12]]] * 2), 40)
    want = F.resize(x, [40, 40], antialias=True)
    torch.testing.assert_close(got, want, atol=CROP_EXACT_ATOL, rtol=0)


def test_crop_resize_identity_window() -> None:
    x = torch.randint(0, 256, (3, 3, 24, 24), generator=torch.Generator().manual_seed(9)).float()
    got = A.crop_resize(x, torch.tensor([[[0, 0, 24, 24], [0, 0, 24, 24]]] * 3), 24)
    assert got.shape == (6, 3, 24, 24)
    assert torch.equal(got[:3], x) and torch.equal(got[3:], x)


def test_crop_resize_is_view_major() -> None:
    x = _smooth(3, 32, 32, seed=5)
    windows = torch.tensor([[[0, 0, 32, 32], [4, 4, 16, 16]]] * 3)
    got = A.crop_resize(x, windows, 16)
    for v in range(2):
        for i in range(3):
            t, l, h, w = windows[i, v].tolist()
            want = A.crop_resize(x[i : i + 1], torch.tensor([[[t, l, h, w]]]), 16)[0]
            torch.testing.assert_close(got[v * 3 + i], want, atol=0, rtol=0)


def test_list_of_different_sizes_equals_each_alone() -> None:
    """A list of images of different sizes (HWC and CHW) is edge-padded to a batch; crops touching the right and
    bottom borders of a smaller image must give what that image gives alone (no padding leaks in)."""
    g = torch.Generator().manual_seed(10)
    shapes = [(20, 28, 3), (3, 32, 24), (17, 13, 3), (3, 40, 44)]
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    hw = [(s[0], s[1]) if s[2] == 3 else (s[1], s[2]) for s in shapes]
    S = 16
    # per image: bottom-right corner up- and down-sampled, and the whole image
    windows = torch.tensor(
        [[[H - 9, W - 7, 9, 7], [H - 14, W - 11, 14, 11], [0, 0, H, W]] for H, W in hw]
    )
    batch = A.to_nchw(images)
    assert batch.shape == (4, 3, 40, 44)
    got = A.crop_resize(batch, windows, S)
    for i, im in enumerate(images):
        alone = A.to_nchw(im[None])
        want = A.crop_resize(alone, windows[i : i + 1], S)
        for v in range(3):
            torch.testing.assert_close(got[v * 4 + i], want[v], atol=CROP_EXACT_ATOL, rtol=0, msg=f"image {i}")
    # and the same through the Augmenter, with no random op
    aug = Augmenter(AugmentConfig(size=S, views=(NO_AUG,)))
    out = aug(images, windows)
    for i, im in enumerate(images):
        alone = aug(im[None], windows[i : i + 1])
        for v in range(3):
            torch.testing.assert_close(out[v][i], alone[v][0], atol=1e-4, rtol=0)


# ============================================================================ the Augmenter end to end
def _images(n: int = 4, H: int = 40, W: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _windows(n: int = 4) -> torch.Tensor:
    return torch.tensor([[0, 0, 40, 48], [5, 6, 20, 30]]).repeat(n, 1, 1)


def test_augmenter_outputs() -> None:
    images, windows = _images(), _windows()
    out = Augmenter(preset("mocov2", size=24))(images, windows, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, list) and len(out) == 2
    for y in out:
        assert y.shape == (4, 3, 24, 24) and y.dtype == torch.float32 and y.device == images.device
        assert y.is_contiguous()
        assert torch.isfinite(y).all()
    # one view of the whole image without windows
    (one,) = Augmenter(preset("mocov2", size=24))(images)
    assert one.shape == (4, 3, 24, 24)
    # three views
    out3 = Augmenter(preset("byol", size=16))(images, torch.cat([windows, windows[:, :1]], dim=1))
    assert [tuple(y.shape) for y in out3] == [(4, 3, 16, 16)] * 3


def test_augmenter_channels_last() -> None:
    images, windows = _images(), _windows()
    a = Augmenter(preset("mocov2", size=24), channels_last=True)(images, windows, torch.Generator().manual_seed(1))
    b = Augmenter(preset("mocov2", size=24))(images, windows, torch.Generator().manual_seed(1))
    for ya, yb in zip(a, b):
        assert ya.is_contiguous(memory_format=torch.channels_last)
        assert not yb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya, yb)


def test_augmenter_nhwc_equals_nchw() -> None:
    images, windows = _images(), _windows()
    aug = Augmenter(preset("simclr", size=24))
    a = aug(images, windows, torch.Generator().manual_seed(2))
    b = aug(images.permute(0, 2, 3, 1).contiguous(), windows, torch.Generator().manual_seed(2))
    c = aug(images.permute(0, 2, 3, 1).contiguous(), windows, torch.Generator().manual_seed(2), layout="hwc")
    for ya, yb, yc in zip(a, b, c):
        assert torch.equal(ya, yb) and torch.equal(ya, yc)


def test_augmenter_seeded() -> None:
    images, windows = _images(), _windows()
    aug = Augmenter(preset("mocov2", size=24))
    a = aug(images, windows, torch.Generator().manual_seed(3))
    b = aug(images, windows, torch.Generator().manual_seed(3))
    c = aug(images, windows, torch.Generator().manual_seed(4))
    for ya, yb, yc in zip(a, b, c):
        assert torch.equal(ya, yb)
        assert not torch.allclose(ya, yc)
    # windows as a numpy array are accepted
    d = aug(images, windows.numpy(), torch.Generator().manual_seed(3))
    assert all(torch.equal(ya, yd) for ya, yd in zip(a, d))


@pytest.mark.parametrize("shape", [(4, 4), (3, 2, 4), (5, 2, 4), (4, 2, 3), (4, 2, 4, 1)])
def test_augmenter_bad_windows(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="windows"):
        Augmenter(preset("mocov2", size=16))(_images(), torch.zeros(shape, dtype=torch.int64))


def test_presets() -> None:
    for name in ("mocov2", "mocov2_small", "simclr", "byol"):
        cfg = preset(name, size=32)
        assert isinstance(cfg, AugmentConfig) and cfg.size == 32 and len(cfg.views) >= 1
    assert preset("mocov2").size == 224 and preset("mocov2").kernel_size == 23
    assert preset("mocov2_small").views[0].blur == 0
    assert preset("simclr").views[0].jitter == (0.8, 0.8, 0.8, 0.2)
    byol = preset("byol").views
    assert len(byol) == 2 and byol[0] != byol[1]
    assert byol[0].blur == 1.0 and byol[0].solarize == 0.0 and byol[1].blur == 0.1 and byol[1].solarize == 0.2
    with pytest.raises(ValueError, match="nope"):
        preset("nope")


def test_byol_solarizes_only_view_2() -> None:
    """White images: brightness (>= 0.6), contrast, saturation, hue, gray and blur all leave a value >= 0.6, and
    solarize turns it into <= 0.4; so a sample is solarized iff its output is dark. View 1 never is; view 2 is for
    exactly the samples draw_params (same generator, view 1's draw first) marks, about 20 %."""
    n, S = 200, 16
    images = torch.full((n, 3, 24, 24), 255, dtype=torch.uint8)
    windows = torch.tensor([[0, 0, 24, 24], [2, 2, 20, 20]]).repeat(n, 1, 1)
    cfg = preset("byol", size=S)
    v1, v2 = Augmenter(cfg)(images, windows, torch.Generator().manual_seed(5))
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    dark1 = (v1 * std + mean).amax(dim=(1, 2, 3)) < 0.5
    dark2 = (v2 * std + mean).amax(dim=(1, 2, 3)) < 0.5
    g = torch.Generator().manual_seed(5)
    p1, p2 = draw_params(cfg.views[0], n, g), draw_params(cfg.views[1], n, g)
    assert not p1.solarize.any() and not dark1.any()
    assert torch.equal(dark2, p2.solarize)
    assert 0.1 < dark2.float().mean() < 0.3
    assert p1.blur.all() and 0 < p2.blur.float().mean() < 0.2


# ============================================================================ per-sample probabilities
def _near(mask: torch.Tensor, p: float) -> None:
    n = mask.numel()
    frac = mask.float().mean().item()
    assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (frac, p)


@pytest.mark.parametrize("name", ["mocov2", "byol"])
def test_draw_params_probabilities(name: str) -> None:
    n = 20000
    g = torch.Generator().manual_seed(12)
    for cfg in preset(name).views:
        p = draw_params(cfg, n, g)
        _near(p.flip, cfg.flip)
        _near(p.jitter, cfg.jitter_p)
        _near(p.gray, cfg.grayscale)
        _near(p.blur, cfg.blur)
        _near(p.solarize, cfg.solarize)
        # independent draws, not one uniform reused for every mask
        _near(p.flip & p.jitter, cfg.flip * cfg.jitter_p)
        _near(p.gray & p.flip, cfg.grayscale * cfg.flip)
        # factor ranges as ColorJitter's, sigma range, and orders are uniformly random permutations
        b, c, s, h = cfg.jitter
        lo = torch.tensor([1 - b, 1 - c, 1 - s, -h])
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
        assert ((p.factors >= lo) & (p.factors <= hi)).all()
        assert ((p.factors.amin(0) - lo).abs() < 0.01).all() and ((p.factors.amax(0) - hi).abs() < 0.01).all()
        assert (p.sigma >= cfg.blur_sigma[0]).all() and (p.sigma <= cfg.blur_sigma[1]).all()
        assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
        for op in range(4):
            _near(p.order[:, 0] == op, 0.25)
        for key in ("flip", "jitter", "gray", "blur", "solarize"):
            assert getattr(p, key).dtype == torch.bool and getattr(p, key).shape == (n,)
