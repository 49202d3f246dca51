"""The fused Triton kernels (viewpipe.fused) against the torch reference (viewpipe.augment), on CPU tensors through
Triton's interpreter.

Tolerances (outputs of `photometric` are in normalised units, i.e. ([0, 1] value - mean) / std, std ~0.22):

- float32 output: atol F32_ATOL = 2e-4 normalised units (~4.5e-5 in [0, 1] units, ~0.01 grey level). The kernels
  evaluate the same formulas in float32 in another order (contrast means summed per block, the blur's separable
  taps accumulated by hand, uint8 scaled by a reciprocal), so only rounding differs (typically <= 2e-6).
- bfloat16 output: compared with the float32 reference cast to bfloat16, atol BF16_ATOL = 0.02 normalised units:
  bfloat16 has an 8-bit significand, one ulp is 2^-6 = 0.0156 for |values| in [2, 4); the kernel and the cast
  may round a value that sits near a rounding boundary to neighbouring bfloat16 numbers, at most one ulp apart.
- crop_resize: atol CROP_ATOL = 1e-3 in [0, 255] units (float32 rounding of roi_align's coordinates and weights;
  the same slack as tests/test_augment.py's CROP_EXACT_ATOL).

All sizes are small (<= 40 px) because the interpreter runs each program in numpy; every random draw uses a fixed
seed.
"""

from __future__ import annotations

import itertools
import platform
import sys
from dataclasses import replace

import pytest
import torch

if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):  # where pip cannot install triton
    pytest.skip(f"triton has no wheel for {sys.platform}/{platform.machine()}: the fused kernels' interpreter tests "
                "need it (Linux x86-64 or aarch64, `pip install viewpipe[dev]`)", allow_module_level=True)

from conftest import view_params  # noqa: E402
from viewpipe import augment as A  # noqa: E402
from viewpipe import fused  # noqa: E402
from viewpipe.augment import AugmentConfig, Augmenter, ViewAugment, ViewParams, draw_params, preset  # noqa: E402


def test_the_kernels_run_in_triton_s_interpreter() -> None:
    """conftest.py sets TRITON_INTERPRET=1 before anything imports torch (which imports triton): Triton decides
    at decoration time whether a kernel, its own language functions included, is compiled or interpreted."""
    from triton.runtime.interpreter import InterpretedFunction

    assert fused.available() and fused.interpreted()
    assert isinstance(fused._photometric_kernel, InterpretedFunction)


F32_ATOL = 2e-4
BF16_ATOL = 0.02
CROP_ATOL = 1e-3

MEAN, STD = A.IMAGENET_MEAN, A.IMAGENET_STD
ALL_JITTER = ViewAugment(jitter=(0.4, 0.4, 0.4, 0.1))
PRESETS_MOCOV2 = preset("mocov2").views[0]


# ============================================================================ helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images01(n: int, H: int, W: int, seed: int) -> torch.Tensor:
    """Random float (n,3,H,W) in [0, 1] with the special pixels of the HSV conversion and the clamps: gray
    pixels, pure and two-channel colours, exact 0 and 1, and values at the solarize threshold."""
    x = torch.rand((n, 3, H, W), generator=_gen(seed))
    x[:, :, 0, : min(W, 3)] = x[:, :1, 0, : min(W, 3)]  # gray
    specials = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.25], [0.2, 0.9, 0.2]]
    )
    for j, rgb in enumerate(specials[: W]):
        x[:, :, min(1, H - 1), j] = rgb
    return x


def _images_u8(n: int, H: int, W: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, H, W), dtype=torch.uint8, generator=_gen(seed))


def _params(n: int, **kw: torch.Tensor) -> ViewParams:
    """Hand-made ViewParams: everything off unless given (the jitter factors are deliberately not the identity:
    an op that is off or whose strength is 0 in the config must have no effect)."""
    return view_params(n, **{"factors": torch.tensor([[1.3, 0.6, 1.5, 0.2]]).repeat(n, 1), **kw})


def _to01(x: torch.Tensor, layout: str = "chw") -> torch.Tensor:
    """x as float NCHW in [0, 1] (uint8 / 255)."""
    if layout == "hwc":
        x = x.permute(0, 3, 1, 2)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _reference(x, p, cfg, k, mean=MEAN, std=STD, layout="chw") -> torch.Tensor:
    """(viewpipe.augment.photometric(x01) - mean) / std, float32 NCHW contiguous."""
    y = A.photometric(_to01(x, layout).contiguous().clone(), p, cfg, k)
    return ((y - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous()


def _check(got: torch.Tensor, want: torch.Tensor, *, atol: float = F32_ATOL, what: str = "") -> None:
    """got == want within atol, naming the worst sample on failure."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().flatten(1).amax(1)
    bad = (err > atol).nonzero().flatten().tolist()
    assert not bad, f"{what}: samples {bad} differ, max |err| per sample {[round(float(err[i]), 6) for i in bad]}"


def _fused_vs_ref(x, p, cfg, k, *, mean=MEAN, std=STD, layout="chw", out_dtype=torch.float32,
                  channels_last=False, what="") -> torch.Tensor:
    before = x.clone()
    got = fused.photometric(x, p, cfg, k, mean, std, layout=layout, out_dtype=out_dtype, channels_last=channels_last)
    assert torch.equal(x, before), "the input was modified"
    assert got.shape == (x.shape[0], 3, *((x.shape[1:3]) if layout == "hwc" else x.shape[2:4]))
    assert got.dtype == out_dtype
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()
    want = _reference(x, p, cfg, k, mean, std, layout)
    if out_dtype == torch.bfloat16:
        _check(got, want.to(torch.bfloat16), atol=BF16_ATOL, what=what)
    else:
        _check(got, want, what=what)
    return got


def test_available() -> None:
    assert fused.available() is True


# ============================================================================ single photometric ops
FACTORS = torch.tensor([0.0, 0.2, 0.6, 1.0, 1.3, 1.8, 2.5])
HUES = torch.tensor([-0.5, -0.31, -0.05, 0.0, 0.1, 0.37, 0.5])
OP_NAMES = ("brightness", "contrast", "saturation", "hue")


@pytest.mark.parametrize("op", range(4), ids=OP_NAMES)
def test_single_jitter_op(op: int) -> None:
    """One jitter op with per-sample factors; the other three have non-identity factors but strength 0 in the
    config (the torch path skips them), and one sample is not jittered at all."""
    n = 7
    strengths = [0.0] * 4
    strengths[op] = 0.5
    cfg = ViewAugment(jitter=tuple(strengths))
    factors = torch.tensor([[1.3, 0.6, 1.5, 0.2]]).repeat(n, 1)
    factors[:, op] = HUES if op == 3 else FACTORS
    order = torch.stack([torch.randperm(4, generator=_gen(50 + i)) for i in range(n)])
    jitter = torch.ones(n, dtype=torch.bool)
    jitter[4] = False
    p = _params(n, jitter=jitter, factors=factors, order=order)
    x = _images01(n, 13, 17, seed=1)
    got = _fused_vs_ref(x, p, cfg, 3, what=OP_NAMES[op])
    # the op did something (guards the test itself): a jittered sample with a non-identity factor changed
    unchanged = _reference(x, _params(n), cfg, 3)
    assert not torch.allclose(got[0], unchanged[0], atol=1e-2)
    torch.testing.assert_close(got[4], unchanged[4], atol=F32_ATOL, rtol=0)


def test_flip() -> None:
    n = 4
    p = _params(n, flip=torch.tensor([True, False, True, False]))
    x = _images01(n, 7, 5, seed=2)
    got = _fused_vs_ref(x, p, ALL_JITTER, 3, what="flip")
    norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got[0], norm[0].flip(-1), atol=F32_ATOL, rtol=0)
    torch.testing.assert_close(got[1], norm[1], atol=F32_ATOL, rtol=0)


def test_grayscale() -> None:
    n = 4
    p = _params(n, gray=torch.tensor([True, False, False, True]))
    x = _images01(n, 9, 11, seed=3)
    got = _fused_vs_ref(x, p, ALL_JITTER, 3, what="grayscale")
    y = got * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(y[0, 0], y[0, 1], atol=1e-5) and torch.allclose(y[0, 1], y[0, 2], atol=1e-5)
    assert not torch.allclose(y[1, 0], y[1, 1], atol=1e-2)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize(threshold: float) -> None:
    n = 4
    cfg = replace(ALL_JITTER, solarize=0.5, solarize_threshold=threshold)
    p = _params(n, solarize=torch.tensor([True, False, True, True]))
    x = _images01(n, 8, 10, seed=4)
    x[0, :, 2, :4] = torch.tensor([threshold, threshold - 1e-3, threshold + 1e-3, 0.999])
    _fused_vs_ref(x, p, cfg, 3, what=f"solarize {threshold}")


def test_normalisation() -> None:
    """No random op: only (x - mean) / std, with a non-ImageNet mean and std per channel."""
    n, mean, std = 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = _images01(n, 6, 9, seed=5)
    got = _fused_vs_ref(x, _params(n), ALL_JITTER, 3, mean=mean, std=std, what="normalisation")
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want, atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("k, H, W", [(3, 12, 12), (5, 13, 12), (9, 12, 17), (9, 33, 34)])
def test_blur_per_sample_sigma(k: int, H: int, W: int) -> None:
    """Reflect padding at every border, a σ per sample from 0.1 (nearly the identity) to 2.0, some samples not
    blurred (so blurred samples are not contiguous in the batch); 33×34 spans two 1024-pixel blocks."""
    n = 6
    sigma = torch.tensor([0.1, 2.0, 0.12, 1.3, 1.95, 0.7])
    blur = torch.tensor([True, True, False, True, True, False])
    p = _params(n, blur=blur, sigma=sigma)
    x = _images01(n, H, W, seed=6 + k)
    got = _fused_vs_ref(x, p, ALL_JITTER, k, what=f"blur k={k}")
    unblurred = _reference(x, _params(n), ALL_JITTER, k)
    assert not torch.allclose(got[1], unblurred[1], atol=1e-2)  # σ = 2 blurs
    torch.testing.assert_close(got[2], unblurred[2], atol=F32_ATOL, rtol=0)


def test_blur_with_flip_gray_and_solarize() -> None:
    """Blur sits between grayscale and solarize: the blurred samples take the blur kernels' epilogue."""
    n = 4
    cfg = replace(ALL_JITTER, solarize=0.5)
    p = _params(
        n,
        flip=torch.tensor([True, False, True, False]),
        gray=torch.tensor([True, True, False, False]),
        blur=torch.ones(n, dtype=torch.bool),
        sigma=torch.tensor([0.5, 1.5, 2.0, 0.1]),
        solarize=torch.tensor([True, False, True, True]),
    )
    _fused_vs_ref(_images01(n, 14, 12, seed=7), p, cfg, 5, what="blur+flip+gray+solarize")


# ============================================================================ jitter orders
def test_all_24_jitter_orders() -> None:
    """One sample per permutation of (brightness, contrast, saturation, hue), all four active, the same image
    and factors: contrast blends with the gray mean of the image as it stands at its place in the order, so the
    orders give different results, and each must match the reference."""
    perms = list(itertools.permutations(range(4)))
    n = len(perms)
    x = _images01(1, 11, 14, seed=8).expand(n, -1, -1, -1).contiguous()
    p = _params(
        n,
        jitter=torch.ones(n, dtype=torch.bool),
        factors=torch.tensor([[1.6, 0.4, 1.7, 0.23]]).repeat(n, 1),
        order=torch.tensor(perms),
    )
    got = fused.photometric(x, p, ALL_JITTER, 3, MEAN, STD)
    want = _reference(x, p, ALL_JITTER, 3)
    err = (got - want).abs().flatten(1).amax(1)
    bad = [(perms[i], float(err[i])) for i in range(n) if err[i] > F32_ATOL]
    assert not bad, f"orders that differ from the reference (order, max |err|): {bad}"
    # orders differ: every pair of different orders differs somewhere
    flat = got.flatten(1)
    dist = torch.cdist(flat, flat, p=float("inf"))
    assert (dist + torch.eye(n) > 1e-3).all(), "some orders give the same image"
    # contrast's mean is taken where contrast comes: brightness before or after contrast matters
    b_then_c = [i for i, o in enumerate(perms) if o == (0, 1, 2, 3)][0]
    c_then_b = [i for i, o in enumerate(perms) if o == (1, 0, 2, 3)][0]
    assert (got[b_then_c] - got[c_then_b]).abs().max() > 0.05


def test_contrast_mean_after_other_ops_multi_block() -> None:
    """Per-sample orders on different images spanning several blocks (40×29 > 1024 pixels): the contrast mean is
    reduced over blocks after the ops that precede contrast."""
    n = 6
    perms = [(0, 1, 2, 3), (3, 2, 0, 1), (2, 3, 1, 0), (1, 3, 0, 2), (3, 0, 2, 1), (0, 2, 3, 1)]
    factors = torch.tensor([[1.8, 0.3, 0.2, 0.4], [0.5, 1.9, 1.6, -0.3], [1.2, 0.0, 2.0, 0.5],
                            [0.7, 1.5, 0.6, -0.5], [1.4, 0.8, 1.1, 0.15], [0.9, 1.7, 0.3, -0.12]])
    p = _params(n, jitter=torch.ones(n, dtype=torch.bool), factors=factors, order=torch.tensor(perms))
    _fused_vs_ref(_images01(n, 40, 29, seed=9), p, ALL_JITTER, 3, what="orders, 40x29")


# ============================================================================ random mixes of all ops
MIXES = {
    "mocov2-s0": ("mocov2", 0, 0, None),
    "mocov2-s1": ("mocov2", 0, 1, None),
    "simclr": ("simclr", 0, 2, None),
    "byol-v1": ("byol", 0, 3, None),
    "byol-v2": ("byol", 1, 4, None),
    "mocov2-solarize": ("mocov2", 0, 5, 0.5),
}


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_random_mix(mix) -> None:
    name, view, seed, solarize = mix
    cfg = preset(name, size=40)
    vcfg = cfg.views[view]
    if solarize is not None:
        vcfg = replace(vcfg, solarize=solarize)
    n = 10
    p = draw_params(vcfg, n, _gen(100 + seed))
    _fused_vs_ref(_images01(n, 31, 33, seed=seed), p, vcfg, cfg.kernel_size, what=f"{name} view {view}")


def _mix(n: int, seed: int) -> tuple[ViewParams, ViewAugment]:
    """mocov2 with solarize, every op on for some samples and off for others."""
    vcfg = replace(PRESETS_MOCOV2, solarize=0.5)
    p = draw_params(vcfg, n, _gen(seed))
    half = torch.arange(n) % 2 == 0
    p.jitter, p.blur, p.gray, p.solarize = ~half, half, torch.arange(n) % 3 == 0, torch.arange(n) % 4 < 2
    return p, vcfg


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_out_dtype_and_memory_format(out_dtype: torch.dtype, channels_last: bool) -> None:
    n = 6
    p, vcfg = _mix(n, seed=11)
    x = _images01(n, 12, 13, seed=11)
    got = _fused_vs_ref(x, p, vcfg, 5, out_dtype=out_dtype, channels_last=channels_last,
                        what=f"{out_dtype} channels_last={channels_last}")
    if channels_last:  # same values as the NCHW output
        plain = fused.photometric(x, p, vcfg, 5, MEAN, STD, out_dtype=out_dtype)
        assert torch.equal(got, plain)


# ============================================================================ input layouts, strides, sizes
def test_uint8_nhwc_equals_float_nchw() -> None:
    n = 6
    p, vcfg = _mix(n, seed=12)
    u8 = _images_u8(n, 10, 14, seed=12)
    nhwc = u8.permute(0, 2, 3, 1).contiguous()
    a = _fused_vs_ref(nhwc, p, vcfg, 3, layout="hwc", what="uint8 NHWC")
    b = _fused_vs_ref(u8.float() / 255, p, vcfg, 3, what="float NCHW")
    c = _fused_vs_ref(u8, p, vcfg, 3, what="uint8 NCHW")
    torch.testing.assert_close(a, b, atol=F32_ATOL, rtol=0)
    torch.testing.assert_close(a, c, atol=F32_ATOL, rtol=0)


def test_any_strides() -> None:
    """Non-contiguous inputs: an NCHW view of NHWC memory, a sliced batch, and an NHWC view of NCHW memory."""
    n = 4
    p, vcfg = _mix(n, seed=13)
    base = _images01(2 * n, 12, 26, seed=13)
    sliced = base[::2, :, :, ::2]  # (4, 3, 12, 13), strides of neither layout
    assert not sliced.is_contiguous()
    _fused_vs_ref(sliced, p, vcfg, 3, what="sliced")
    nhwc_mem = sliced.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NCHW view, NHWC memory
    _fused_vs_ref(nhwc_mem, p, vcfg, 3, what="NCHW view of NHWC memory")
    nhwc_view = sliced.contiguous().permute(0, 2, 3, 1)  # layout hwc, NCHW memory
    _fused_vs_ref(nhwc_view, p, vcfg, 3, layout="hwc", what="NHWC view of NCHW memory")


@pytest.mark.parametrize("H, W", [(7, 5), (5, 7), (31, 33), (1, 6), (33, 32)])
def test_odd_sizes(H: int, W: int) -> None:
    """Sides that are multiples of no block size; 33×32 = 1056 pixels spans two blocks. Blur needs a side >
    kernel_size // 2 for reflect padding, so the 1-row image is not blurred."""
    n = 5
    p, vcfg = _mix(n, seed=14)
    if H < 2:
        p.blur = torch.zeros(n, dtype=torch.bool)
    _fused_vs_ref(_images01(n, H, W, seed=14), p, vcfg, 3, what=f"{H}x{W}")


def test_batch_of_one() -> None:
    vcfg = replace(PRESETS_MOCOV2, solarize=0.5)
    p = _params(1, flip=torch.tensor([True]), jitter=torch.tensor([True]), order=torch.tensor([[2, 1, 3, 0]]),
                gray=torch.tensor([False]), blur=torch.tensor([True]), sigma=torch.tensor([1.1]),
                solarize=torch.tensor([True]))
    _fused_vs_ref(_images01(1, 12, 15, seed=15), p, vcfg, 5, what="batch of 1")
    _fused_vs_ref(_images_u8(1, 9, 6, seed=16), draw_params(vcfg, 1, _gen(16)), vcfg, 3, what="batch of 1 u8")


def test_empty_batch() -> None:
    x = torch.rand(0, 3, 8, 8)
    p = draw_params(PRESETS_MOCOV2, 0, _gen(0))
    out = fused.photometric(x, p, PRESETS_MOCOV2, 3, MEAN, STD)
    assert out.shape == (0, 3, 8, 8)


# ============================================================================ crop and resize
def _random_windows(n: int, V: int, lo: int, hi: int, H: int, W: int, seed: int) -> torch.Tensor:
    """(n, V, 4) windows (top, left, h, w) of sides in [lo, hi] inside an H×W image."""
    g = _gen(seed)
    h = torch.randint(lo, min(hi, H) + 1, (n, V), generator=g)
    w = torch.randint(lo, min(hi, W) + 1, (n, V), generator=g)
    top = (torch.rand(n, V, generator=g) * (H - h + 1)).long()
    left = (torch.rand(n, V, generator=g) * (W - w + 1)).long()
    return torch.stack([top, left, h, w], dim=2)


def _crop_ref(images: torch.Tensor, windows: torch.Tensor, S: int, layout: str = "auto") -> torch.Tensor:
    return A.crop_resize(A.to_nchw(images, layout), windows, S)


CROPS = {
    # name: (S, window side range) — up: window smaller than the output; down: window >= 2x the output, so each
    # output pixel averages a grid of >= 2x2 bilinear samples; mixed: both in one batch
    "up": (16, (3, 15)),
    "down": (8, (16, 40)),
    "mixed": (12, (4, 40)),
}


@pytest.mark.parametrize("kind", CROPS.keys())
@pytest.mark.parametrize("dtype, layout", [(torch.uint8, "chw"), (torch.uint8, "hwc"), (torch.float32, "chw")],
                         ids=["u8-nchw", "u8-nhwc", "f32-nchw"])
def test_crop_resize_vs_roi_align(kind: str, dtype: torch.dtype, layout: str) -> None:
    S, (lo, hi) = CROPS[kind]
    n, V, H, W = 4, 3, 40, 37
    images = _images_u8(n, H, W, seed=20)
    if dtype != torch.uint8:
        images = images.float() + torch.rand(images.shape, generator=_gen(21))  # non-integer values
    windows = _random_windows(n, V, lo, hi, H, W, seed=22 + len(kind))
    windows[0, 0] = torch.tensor([0, 0, H, W])  # the whole image
    windows[1, 0] = torch.tensor([H - windows[1, 0, 2], W - windows[1, 0, 3], windows[1, 0, 2], windows[1, 0, 3]])
    if layout == "hwc":
        images = images.permute(0, 2, 3, 1).contiguous()
    got = fused.crop_resize(images, windows, S)
    want = _crop_ref(images, windows, S)
    assert got.shape == (V * n, 3, S, S) and got.dtype == torch.float32
    for v in range(V):
        for i in range(n):
            where = f"view {v} sample {i} window {windows[i, v].tolist()}"
            torch.testing.assert_close(got[v * n + i], want[v * n + i], atol=CROP_ATOL, rtol=0,
                                       msg=lambda m, where=where: f"{where}: {m}")
    # explicit layout and scale
    got2 = fused.crop_resize(images, windows, S, layout=layout, scale=1 / 255)
    torch.testing.assert_close(got2, want / 255, atol=CROP_ATOL / 255, rtol=0)


def test_crop_resize_two_blocks_and_strided_input() -> None:
    """An output of 33×33 = 1089 pixels (two blocks), from a non-contiguous (sliced) batch."""
    base = _images_u8(6, 40, 40, seed=23)
    images = base[::2, :, 1:, :36]  # (3, 3, 39, 36)
    windows = torch.tensor([[[0, 0, 39, 36], [2, 3, 20, 11]], [[5, 1, 34, 35], [0, 0, 7, 9]],
                            [[30, 28, 9, 8], [1, 2, 38, 33]]])
    got = fused.crop_resize(images, windows, 33)
    torch.testing.assert_close(got, _crop_ref(images, windows, 33), atol=CROP_ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_crop_resize_sizes_padding(layout: str) -> None:
    """Images of different sizes in one padded tensor whose padding is junk (not edge-replicated): with `sizes`,
    each crop equals cropping that image alone, for windows touching the image's bottom-right border, enlarged
    and shrunk, and the whole image."""
    hw = [(20, 28), (40, 36), (17, 13), (33, 40)]
    n, S = len(hw), 8
    g = _gen(24)
    padded = torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=g)  # junk everywhere
    alone = []
    for i, (h, w) in enumerate(hw):
        im = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g)
        padded[i, :, :h, :w] = im[0]
        alone.append(im)
    windows = torch.tensor([[[h - 5, w - 6, 5, 6], [h - 17, w - 12, 17, 12], [0, 0, h, w]] for h, w in hw])
    sizes = torch.tensor(hw)
    x = padded.permute(0, 2, 3, 1).contiguous() if layout == "hwc" else padded
    got = fused.crop_resize(x, windows, S, sizes=sizes, layout=layout)
    V = windows.shape[1]
    for i in range(n):
        want = A.crop_resize(alone[i].float(), windows[i : i + 1], S)
        for v in range(V):
            where = f"image {i} {hw[i]} window {windows[i, v].tolist()}"
            torch.testing.assert_close(got[v * n + i], want[v], atol=CROP_ATOL, rtol=0,
                                       msg=lambda m, where=where: f"{where}: {m}")


def test_crop_resize_windows_past_the_border() -> None:
    """Windows reaching past the image's borders (negative top/left, or beyond H, W): roi_align's semantics, where
    bilinear samples beyond one pixel outside the image contribute 0 but still count in the average."""
    images = _images_u8(2, 16, 14, seed=26)
    windows = torch.tensor([[[-3, -2, 10, 9], [8, 7, 12, 11]], [[-6, 4, 30, 8], [2, -9, 6, 30]]])
    for S in (6, 20):
        got = fused.crop_resize(images, windows, S)
        torch.testing.assert_close(got, _crop_ref(images, windows, S), atol=CROP_ATOL, rtol=0,
                                   msg=lambda m, S=S: f"S={S}: {m}")


def test_crop_resize_sizes_equal_to_tensor() -> None:
    """`sizes` equal to the tensor's H, W is the default."""
    images = _images_u8(2, 21, 19, seed=25)
    windows = _random_windows(2, 2, 3, 21, 21, 19, seed=25)
    a = fused.crop_resize(images, windows, 10)
    b = fused.crop_resize(images, windows, 10, sizes=torch.tensor([[21, 19], [21, 19]]))
    assert torch.equal(a, b)


# ============================================================================ the Augmenter, fused vs torch
def _aug_pair(cfg: AugmentConfig, **kw) -> tuple[Augmenter, Augmenter]:
    return Augmenter(cfg, impl="fused", **kw), Augmenter(cfg, impl="torch", **kw)


def _aug_images(n: int = 4, H: int = 30, W: int = 36, seed: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    images = _images_u8(n, H, W, seed)
    windows = torch.tensor([[0, 0, H, W], [3, 5, 9, 7], [2, 1, 26, 33]]).repeat(n, 1, 1)
    windows[:, 1:] = _random_windows(n, 2, 5, 30, H, W, seed)
    return images, windows


@pytest.mark.parametrize("name", ["byol", "mocov2"])
def test_augmenter_forward_fused_vs_torch(name: str) -> None:
    cfg = preset(name, size=12)
    images, windows = _aug_images()
    fz, th = _aug_pair(cfg)
    a = fz(images, windows, generator=_gen(31))
    b = th(images, windows, generator=_gen(31))
    assert len(a) == len(b) == 3
    for v, (ya, yb) in enumerate(zip(a, b)):
        assert ya.shape == yb.shape == (4, 3, 12, 12) and ya.dtype == torch.float32 and ya.is_contiguous()
        _check(ya, yb, what=f"{name} view {v}")
    # NHWC input
    c = fz(images.permute(0, 2, 3, 1).contiguous(), windows, generator=_gen(31))
    for v, (yc, yb) in enumerate(zip(c, b)):
        _check(yc, yb, what=f"{name} NHWC view {v}")


def test_augmenter_forward_list_of_sizes() -> None:
    """A list of images of different sizes (the fused path crops each from its own size inside the batch)."""
    g = _gen(32)
    shapes = [(20, 28, 3), (3, 32, 24), (17, 13, 3)]
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    hw = [(s[0], s[1]) if s[2] == 3 else (s[1], s[2]) for s in shapes]
    windows = torch.tensor([[[h - 9, w - 7, 9, 7], [0, 0, h, w]] for h, w in hw])
    cfg = preset("simclr", size=8)
    fz, th = _aug_pair(cfg)
    for v, (ya, yb) in enumerate(zip(fz(images, windows, _gen(33)), th(images, windows, _gen(33)))):
        _check(ya, yb, what=f"list view {v}")


def test_augmenter_forward_sizes() -> None:
    """A padded uint8 NHWC batch with junk in the padding and each image's true size in `sizes`."""
    hw = [(20, 28), (30, 36), (17, 13)]
    g = _gen(38)
    padded = torch.randint(0, 256, (3, 30, 36, 3), dtype=torch.uint8, generator=g)
    windows = torch.tensor([[[h - 9, w - 7, 9, 7], [0, 0, h, w]] for h, w in hw])
    cfg = preset("byol", size=8)
    fz, th = _aug_pair(cfg)
    a = fz(padded, windows, _gen(39), sizes=torch.tensor(hw))
    b = th(padded, windows, _gen(39), sizes=torch.tensor(hw))
    for v, (ya, yb) in enumerate(zip(a, b)):
        _check(ya, yb, what=f"sizes view {v}")
    # and each image alone, unpadded, gives the same views (no random op, so samples are independent)
    plain = replace(cfg, views=(ViewAugment(flip=0.0, jitter_p=0.0, grayscale=0.0, blur=0.0),))
    fz = Augmenter(plain, impl="fused")
    a = fz(padded, windows, sizes=torch.tensor(hw))
    for i, (h, w) in enumerate(hw):
        alone = fz(padded[i : i + 1, :h, :w].contiguous(), windows[i : i + 1])
        for v in range(2):
            _check(a[v][i : i + 1], alone[v], what=f"image {i} alone, view {v}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_augmenter_finish_fused_vs_torch(channels_last: bool) -> None:
    cfg = replace(preset("mocov2", size=14), views=(replace(PRESETS_MOCOV2, solarize=0.3),))
    u8 = _images_u8(6, 14, 14, seed=34)
    x01 = u8.float() / 255
    fz, th = _aug_pair(cfg, channels_last=channels_last)
    want = th.finish(x01.clone(), 0, generator=_gen(35))
    cases = {
        "fused float": fz.finish(x01.clone(), 0, generator=_gen(35)),
        "fused uint8": fz.finish(u8, 0, generator=_gen(35)),
        "fused uint8 hwc": fz.finish(u8.permute(0, 2, 3, 1).contiguous(), 0, generator=_gen(35), layout="hwc"),
        "torch uint8": th.finish(u8, 0, generator=_gen(35)),
        "torch uint8 hwc": th.finish(u8.permute(0, 2, 3, 1).contiguous(), 0, generator=_gen(35), layout="hwc"),
    }
    for what, got in cases.items():
        assert got.dtype == torch.float32
        if channels_last:
            assert got.is_contiguous(memory_format=torch.channels_last), what
        else:
            assert got.is_contiguous(), what
        _check(got, want, what=what)


def test_augmenter_fused_bfloat16() -> None:
    cfg = preset("byol", size=10)
    images, windows = _aug_images(n=3, seed=36)
    fz = Augmenter(cfg, impl="fused", out_dtype=torch.bfloat16, channels_last=True)
    th = Augmenter(cfg, impl="torch")
    for v, (ya, yb) in enumerate(zip(fz(images, windows, _gen(37)), th(images, windows, _gen(37)))):
        assert ya.dtype == torch.bfloat16 and ya.is_contiguous(memory_format=torch.channels_last)
        _check(ya, yb.to(torch.bfloat16), atol=BF16_ATOL, what=f"bf16 view {v}")
