"""Fused GPU kernels (Triton) for the augmenter: the function of `viewpipe.torch_ops` in a handful of passes
instead of about twenty kernels per view.

- `crop_views` / `crop_resize`: roi_align's antialiased crop-and-resize (aligned, adaptive sampling grid) read
  straight from uint8 images of any layout, with 64-bit offsets and each image's own size inside a padded batch.
- `finish_view` / `photometric`: per view, one pass for the contrast means (the gray mean of each image as it
  stands where contrast comes in its own order), one pass for flip, the four jitter ops in each sample's order,
  grayscale, solarize and normalisation, in the output dtype and memory format; for the samples to blur two more
  passes (horizontal, then vertical with the rest), torchvision's kernel with reflect padding and each σ.

Parameters come from `viewpipe.augment_params.draw_params`, so a seed gives the torch path's views within float
rounding (tests hold the two equal through Triton's interpreter, `TRITON_INTERPRET=1`, on CPU tensors).
"""

from __future__ import annotations

import os

import torch

from viewpipe.augment_params import ViewAugment, ViewParams, is_hwc
from viewpipe.errors import ViewpipeError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover  (torch's CUDA wheels bring triton)
    triton = None

NP = 16  # floats per sample in the parameter table (see `pack`)
BLOCK = 1024  # pixels per program


def available() -> bool:
    """Whether the fused kernels can run (Triton is importable)."""
    return triton is not None


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x: torch.Tensor) -> None:
    if triton is None:
        raise ViewpipeError("the fused augmentation needs Triton (pip install triton); use impl='torch'")
    if x.device.type != "cuda" and not interpreted():
        raise ViewpipeError(f"the fused augmentation runs on CUDA tensors (got {x.device}); use impl='torch' "
                            "on the CPU, or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter")


def pack(p: ViewParams, cfg: ViewAugment) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's parameters as an (n, NP) float32 table and the indices of the samples to blur. Columns:
    flip, grayscale, blur, solarize, the four jitter factors, the op at each of the four jitter stages (-1:
    none, when the sample is not jittered or the op's strength is 0, as the torch path skips it), σ, and
    the sample's row in the blur buffer (-1: not blurred)."""
    n = len(p.flip)
    table = torch.zeros(n, NP)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = p.flip, p.gray, p.blur, p.solarize
    table[:, 4:8] = p.factors
    enabled = torch.tensor([s > 0 for s in cfg.jitter])
    table[:, 8:12] = torch.where(p.jitter[:, None] & enabled[p.order], p.order, -1).float()
    table[:, 12] = p.sigma
    blurred = p.blur.nonzero().squeeze(1)
    table[blurred, 13] = torch.arange(len(blurred), dtype=torch.float32)
    table[~p.blur, 13] = -1
    return table, blurred


if triton is not None:

    @triton.jit
    def _clamp01(x):
        return tl.minimum(tl.maximum(x, 0.0), 1.0)

    @triton.jit
    def _gray(r, g, b):
        return 0.2989 * r + 0.587 * g + 0.114 * b

    @triton.jit
    def _hue(r, g, b, f):
        """torchvision's adjust_hue on float images: RGB -> HSV, h += f (mod 1), HSV -> RGB."""
        maxc = tl.maximum(tl.maximum(r, g), b)
        minc = tl.minimum(tl.minimum(r, g), b)
        eqc = maxc == minc
        cr = maxc - minc
        s = cr / tl.where(eqc, 1.0, maxc)
        cr_div = tl.where(eqc, 1.0, cr)
        rc = (maxc - r) / cr_div
        gc = (maxc - g) / cr_div
        bc = (maxc - b) / cr_div
        is_r = maxc == r
        is_g = (maxc == g) & (maxc != r)
        h6 = tl.where(is_r, bc - gc, tl.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
        h = h6 / 6.0 + 1.0
        h = h - tl.floor(h)
        h = h + f
        h = h - tl.floor(h)
        v = maxc
        i6 = tl.floor(h * 6.0)
        fr = h * 6.0 - i6
        i = i6.to(tl.int32) % 6
        p = _clamp01(v * (1.0 - s))
        q = _clamp01(v * (1.0 - s * fr))
        t = _clamp01(v * (1.0 - s * (1.0 - fr)))
        r2 = tl.where(i == 0, v, tl.where(i == 1, q, tl.where(i < 4, p, tl.where(i == 4, t, v))))
        g2 = tl.where(i == 0, t, tl.where(i < 3, v, tl.where(i == 3, q, p)))
        b2 = tl.where(i < 2, p, tl.where(i == 2, t, tl.where(i < 5, v, q)))
        return r2, g2, b2

    @triton.jit
    def _jitter_op(r, g, b, op, prm, mean_ptr, n):
        """Jitter op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue; anything else: none)."""
        if op == 0.0:
            f = tl.load(prm + 4)
            r, g, b = _clamp01(r * f), _clamp01(g * f), _clamp01(b * f)
        if op == 1.0:
            f = tl.load(prm + 5)
            m = (1.0 - f) * tl.load(mean_ptr + n)
            r, g, b = _clamp01(f * r + m), _clamp01(f * g + m), _clamp01(f * b + m)
        if op == 2.0:
            f = tl.load(prm + 6)
            m = (1.0 - f) * _gray(r, g, b)
            r, g, b = _clamp01(f * r + m), _clamp01(f * g + m), _clamp01(f * b + m)
        if op == 3.0:
            r, g, b = _hue(r, g, b, tl.load(prm + 7))
        return r, g, b

    @triton.jit
    def _load_rgb(x_ptr, n, h, w, mask, sxn, sxc, sxh, sxw, scale):
        base = x_ptr + n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        r = tl.load(base, mask=mask, other=0).to(tl.float32) * scale
        g = tl.load(base + sxc, mask=mask, other=0).to(tl.float32) * scale
        b = tl.load(base + 2 * sxc, mask=mask, other=0).to(tl.float32) * scale
        return r, g, b

    @triton.jit
    def _store_finished(out_ptr, n, h, w, mask, r, g, b, prm, son, soc, soh, sow, thr, m0, m1, m2, s0, s1, s2):
        """Solarize (when the sample draws it), normalise, and store in the output's dtype and strides."""
        if tl.load(prm + 3) > 0.5:
            r = tl.where(r >= thr, 1.0 - r, r)
            g = tl.where(g >= thr, 1.0 - g, g)
            b = tl.where(b >= thr, 1.0 - b, b)
        base = out_ptr + n.to(tl.int64) * son + h.to(tl.int64) * soh + w.to(tl.int64) * sow
        ty = out_ptr.dtype.element_ty
        tl.store(base, ((r - m0) / s0).to(ty), mask=mask)
        tl.store(base + soc, ((g - m1) / s1).to(ty), mask=mask)
        tl.store(base + 2 * soc, ((b - m2) / s2).to(ty), mask=mask)

    @triton.jit
    def _contrast_mean_kernel(x_ptr, p_ptr, part_ptr, H, W, sxn, sxc, sxh, sxw, scale, T,
                              NP: tl.constexpr, BLOCK: tl.constexpr):
        """Per (sample, block): the sum of the gray image as it stands where contrast comes in the sample's
        order (0 when the sample has no contrast step)."""
        n = tl.program_id(0)
        t = tl.program_id(1)
        prm = p_ptr + n * NP
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H * W
        total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        has = total
        for s in tl.static_range(4):
            has += (tl.load(prm + 8 + s) == 1.0).to(tl.float32)
        if has > 0.0:
            r, g, b = _load_rgb(x_ptr, n, offs // W, offs % W, mask, sxn, sxc, sxh, sxw, scale)
            seen = total
            for s in tl.static_range(4):
                op = tl.load(prm + 8 + s)
                seen += (op == 1.0).to(tl.float32)
                if seen == 0.0:
                    r, g, b = _jitter_op(r, g, b, op, prm, p_ptr, n)
            total = tl.sum(tl.where(mask, _gray(r, g, b), 0.0), axis=0)
        tl.store(part_ptr + n * T + t, total)

    @triton.jit
    def _photometric_kernel(x_ptr, out_ptr, tmp_ptr, p_ptr, mean_ptr, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                            scale, thr, m0, m1, m2, s0, s1, s2, NP: tl.constexpr, BLOCK: tl.constexpr):
        """Flip, jitter in the sample's order, grayscale; then either the finished pixel (solarize, normalise)
        or, for a sample to blur, the [0, 1] pixel into its row of the blur buffer."""
        n = tl.program_id(0)
        t = tl.program_id(1)
        prm = p_ptr + n * NP
        offs = t * BLOCK + tl.arange(0, BLOCK)
        HW = H * W
        mask = offs < HW
        h = offs // W
        w = offs % W
        ws = tl.where(tl.load(prm + 0) > 0.5, W - 1 - w, w)
        r, g, b = _load_rgb(x_ptr, n, h, ws, mask, sxn, sxc, sxh, sxw, scale)
        for s in tl.static_range(4):
            r, g, b = _jitter_op(r, g, b, tl.load(prm + 8 + s), prm, mean_ptr, n)
        if tl.load(prm + 1) > 0.5:
            y = _gray(r, g, b)
            r, g, b = y, y, y
        slot = tl.load(prm + 13)
        if slot >= 0.0:
            base = tmp_ptr + slot.to(tl.int64) * 3 * HW + offs
            tl.store(base, r, mask=mask)
            tl.store(base + HW, g, mask=mask)
            tl.store(base + 2 * HW, b, mask=mask)
        else:
            _store_finished(out_ptr, n, h, w, mask, r, g, b, prm, son, soc, soh, sow, thr, m0, m1, m2, s0, s1, s2)

    @triton.jit
    def _blur_pass_kernel(src_ptr, dst_ptr, out_ptr, p_ptr, idx_ptr, H, W, son, soc, soh, sow,
                          thr, m0, m1, m2, s0, s1, s2, VERTICAL: tl.constexpr, K: tl.constexpr,
                          NP: tl.constexpr, BLOCK: tl.constexpr):
        """One direction of the separable Gaussian blur (torchvision's kernel, reflect padding, the sample's
        σ) over row j of the blur buffer; the vertical pass finishes the pixel into the output."""
        j = tl.program_id(0)
        t = tl.program_id(1)
        n = tl.load(idx_ptr + j)
        prm = p_ptr + n * NP
        sigma = tl.load(prm + 12)
        offs = t * BLOCK + tl.arange(0, BLOCK)
        HW = H * W
        mask = offs < HW
        h = offs // W
        w = offs % W
        half: tl.constexpr = (K - 1) // 2
        norm = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        for k in tl.static_range(K):
            d = (k - half) / sigma
            norm += tl.exp(-0.5 * d * d)
        base = src_ptr + j.to(tl.int64) * 3 * HW
        r = tl.zeros([BLOCK], tl.float32)
        g = tl.zeros([BLOCK], tl.float32)
        b = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(K):
            d = (k - half) / sigma
            wk = tl.exp(-0.5 * d * d) / norm
            if VERTICAL:
                c = h + (k - half)
                c = tl.where(c < 0, -c, c)
                c = tl.where(c > H - 1, 2 * (H - 1) - c, c)
                src = c * W + w
            else:
                c = w + (k - half)
                c = tl.where(c < 0, -c, c)
                c = tl.where(c > W - 1, 2 * (W - 1) - c, c)
                src = h * W + c
            r += wk * tl.load(base + src, mask=mask, other=0.0)
            g += wk * tl.load(base + HW + src, mask=mask, other=0.0)
            b += wk * tl.load(base + 2 * HW + src, mask=mask, other=0.0)
        if VERTICAL:
            _store_finished(out_ptr, n, h, w, mask, r, g, b, prm, son, soc, soh, sow, thr, m0, m1, m2, s0, s1, s2)
        else:
            dst = dst_ptr + j.to(tl.int64) * 3 * HW + offs
            tl.store(dst, r, mask=mask)
            tl.store(dst + HW, g, mask=mask)
            tl.store(dst + 2 * HW, b, mask=mask)

    @triton.jit
    def _bilinear(x_ptr, base, y, x, Hn, Wn, sxc, sxh, sxw, mask):
        """torchvision roi_align's bilinear_interpolate over one image of size (Hn, Wn), 3 channels."""
        valid = (y >= -1.0) & (y <= Hn) & (x >= -1.0) & (x <= Wn) & mask
        y = tl.maximum(y, 0.0)
        x = tl.maximum(x, 0.0)
        yl = y.to(tl.int32)
        xl = x.to(tl.int32)
        ylast = yl >= Hn - 1
        xlast = xl >= Wn - 1
        yl = tl.where(ylast, Hn - 1, yl)
        xl = tl.where(xlast, Wn - 1, xl)
        yh = tl.where(ylast, yl, yl + 1)
        xh = tl.where(xlast, xl, xl + 1)
        y = tl.where(ylast, yl.to(tl.float32), y)
        x = tl.where(xlast, xl.to(tl.float32), x)
        ly = y - yl.to(tl.float32)
        lx = x - xl.to(tl.float32)
        hy = 1.0 - ly
        hx = 1.0 - lx
        o1 = base + yl.to(tl.int64) * sxh + xl.to(tl.int64) * sxw
        o2 = base + yl.to(tl.int64) * sxh + xh.to(tl.int64) * sxw
        o3 = base + yh.to(tl.int64) * sxh + xl.to(tl.int64) * sxw
        o4 = base + yh.to(tl.int64) * sxh + xh.to(tl.int64) * sxw
        w1 = tl.where(valid, hy * hx, 0.0)
        w2 = tl.where(valid, hy * lx, 0.0)
        w3 = tl.where(valid, ly * hx, 0.0)
        w4 = tl.where(valid, ly * lx, 0.0)
        r = (w1 * tl.load(x_ptr + o1, mask=valid, other=0).to(tl.float32)
             + w2 * tl.load(x_ptr + o2, mask=valid, other=0).to(tl.float32)
             + w3 * tl.load(x_ptr + o3, mask=valid, other=0).to(tl.float32)
             + w4 * tl.load(x_ptr + o4, mask=valid, other=0).to(tl.float32))
        g = (w1 * tl.load(x_ptr + o1 + sxc, mask=valid, other=0).to(tl.float32)
             + w2 * tl.load(x_ptr + o2 + sxc, mask=valid, other=0).to(tl.float32)
             + w3 * tl.load(x_ptr + o3 + sxc, mask=valid, other=0).to(tl.float32)
             + w4 * tl.load(x_ptr + o4 + sxc, mask=valid, other=0).to(tl.float32))
        b = (w1 * tl.load(x_ptr + o1 + 2 * sxc, mask=valid, other=0).to(tl.float32)
             + w2 * tl.load(x_ptr + o2 + 2 * sxc, mask=valid, other=0).to(tl.float32)
             + w3 * tl.load(x_ptr + o3 + 2 * sxc, mask=valid, other=0).to(tl.float32)
             + w4 * tl.load(x_ptr + o4 + 2 * sxc, mask=valid, other=0).to(tl.float32))
        return r, g, b

    @triton.jit
    def _crop_kernel(x_ptr, out_ptr, roi_ptr, sxc, sxh, sxw, S, scale, BLOCK: tl.constexpr):
        """Crop (top, left, h, w) of one image and resize it to S×S as roi_align(aligned=True,
        sampling_ratio=-1) does: each output pixel averages a ceil(h/S)×ceil(w/S) grid of bilinear samples."""
        r_ix = tl.program_id(0)
        t = tl.program_id(1)
        roi = roi_ptr + r_ix * 8
        base = tl.load(roi + 0)
        Hn = tl.load(roi + 1).to(tl.int32)
        Wn = tl.load(roi + 2).to(tl.int32)
        top = tl.load(roi + 3).to(tl.float32)
        left = tl.load(roi + 4).to(tl.float32)
        hh = tl.load(roi + 5).to(tl.float32)
        ww = tl.load(roi + 6).to(tl.float32)
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S * S
        ph = (offs // S).to(tl.float32)
        pw = (offs % S).to(tl.float32)
        bin_h = hh / S
        bin_w = ww / S
        gh = tl.ceil(hh / S).to(tl.int32)
        gw = tl.ceil(ww / S).to(tl.int32)
        r = tl.zeros([BLOCK], tl.float32)
        g = tl.zeros([BLOCK], tl.float32)
        b = tl.zeros([BLOCK], tl.float32)
        for iy in range(0, gh):
            y = top - 0.5 + ph * bin_h + (iy + 0.5) * bin_h / gh
            for ix in range(0, gw):
                x = left - 0.5 + pw * bin_w + (ix + 0.5) * bin_w / gw
                dr, dg, db = _bilinear(x_ptr, base, y, x, Hn, Wn, sxc, sxh, sxw, mask)
                r += dr
                g += dg
                b += db
        count = tl.maximum(gh * gw, 1).to(tl.float32)
        dst = out_ptr + r_ix.to(tl.int64) * 3 * S * S + offs
        tl.store(dst, r / count * scale, mask=mask)
        tl.store(dst + S * S, g / count * scale, mask=mask)
        tl.store(dst + 2 * S * S, b / count * scale, mask=mask)


def _strides(x: torch.Tensor, layout: str) -> tuple[int, int, int, int, int, int]:
    """(H, W, stride of n, c, h, w) of a batch in `layout` ("chw": (N,3,H,W), "hwc": (N,H,W,3))."""
    if layout == "hwc":
        return x.shape[1], x.shape[2], x.stride(0), x.stride(3), x.stride(1), x.stride(2)
    if layout == "chw":
        return x.shape[2], x.shape[3], x.stride(0), x.stride(1), x.stride(2), x.stride(3)
    raise ValueError(f"layout must be 'chw' or 'hwc', got {layout!r}")


def photometric(x: torch.Tensor, p: ViewParams, cfg: ViewAugment, kernel_size: int,
                mean: tuple[float, float, float], std: tuple[float, float, float], *, layout: str = "chw",
                out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """One view's flip, jitter, grayscale, blur, solarize and normalisation of x ((N,3,H,W), or (N,H,W,3) with
    layout="hwc"; uint8 in [0, 255] or float in [0, 1]; any strides) into a new (N,3,H,W) tensor of
    `out_dtype`, channels_last when asked. Equals `viewpipe.torch_ops.finish_view`."""
    _check(x)
    H, W, sxn, sxc, sxh, sxw = _strides(x, layout)
    N, dev = x.shape[0], x.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((N, 3, H, W), dtype=out_dtype, device=dev, memory_format=fmt)
    if N == 0:
        return out
    table, blurred = pack(p, cfg)
    params = table.to(dev, non_blocking=True)
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    T = triton.cdiv(H * W, BLOCK)
    if bool((table[:, 8:12] == 1).any()):  # some sample has a contrast step: its gray means first
        part = torch.empty((N, T), dtype=torch.float32, device=dev)
        _contrast_mean_kernel[(N, T)](x, params, part, H, W, sxn, sxc, sxh, sxw, scale, T, NP=NP, BLOCK=BLOCK)
        means = part.sum(1).div_(H * W)
    else:
        means = params
    nb = len(blurred)
    tmp = torch.empty((nb, 3, H, W), dtype=torch.float32, device=dev) if nb else params
    son, soc, soh, sow = out.stride()
    norm = (cfg.solarize_threshold, *mean, *std)
    _photometric_kernel[(N, T)](x, out, tmp, params, means, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow, scale, *norm,
                                NP=NP, BLOCK=BLOCK)
    if nb:
        idx = blurred.to(torch.int32).to(dev, non_blocking=True)
        tmp2 = torch.empty_like(tmp)
        for vertical, (src, dst) in ((False, (tmp, tmp2)), (True, (tmp2, tmp2))):
            _blur_pass_kernel[(nb, T)](src, dst, out, params, idx, H, W, son, soc, soh, sow, *norm,
                                       VERTICAL=vertical, K=kernel_size, NP=NP, BLOCK=BLOCK)
    return out


def crop_resize(images: torch.Tensor, windows: torch.Tensor, size: int, *, sizes: torch.Tensor | None = None,
                layout: str = "auto", scale: float = 1.0) -> torch.Tensor:
    """Crops (top, left, h, w) of `images` (uint8 or float, (N,3,H,W) or (N,H,W,3)), windows (N,V,4),
    resized to size×size and times `scale`: (V·N, 3, size, size) float32, view-major, as
    `viewpipe.torch_ops.crop_resize`. `sizes` (N, 2): each image's own (height, width) inside a padded batch
    (its edge pixels extend it, as the torch path's edge padding does); default the batch's H, W."""
    _check(images)
    layout = "hwc" if is_hwc(images.shape[1:], layout) else "chw"
    H, W, sxn, sxc, sxh, sxw = _strides(images, layout)
    windows = torch.as_tensor(windows)
    N, V = windows.shape[:2]
    if images.shape[0] != N:
        raise ValueError(f"windows must have shape (N={images.shape[0]}, views, 4), got {tuple(windows.shape)}")
    hw = torch.tensor([H, W]).expand(N, 2) if sizes is None else torch.as_tensor(sizes)
    rois = torch.empty((V, N, 8), dtype=torch.int64)
    rois[:, :, 0] = torch.arange(N) * sxn
    rois[:, :, 1:3] = hw.to(torch.int64)
    rois[:, :, 3:7] = windows.to(torch.int64).transpose(0, 1)
    rois[:, :, 7] = 0
    out = torch.empty((V * N, 3, size, size), dtype=torch.float32, device=images.device)
    if V * N:
        T = triton.cdiv(size * size, BLOCK)
        _crop_kernel[(V * N, T)](images, out, rois.view(V * N, 8).to(images.device, non_blocking=True),
                                 sxc, sxh, sxw, size, scale, BLOCK=BLOCK)
    return out


def crop_views(images: torch.Tensor, windows: torch.Tensor, size: int, *, sizes: torch.Tensor | None = None,
               layout: str = "auto") -> torch.Tensor:
    """`crop_resize` of a uint8 batch into [0, 1], as `viewpipe.torch_ops.crop_views`."""
    return crop_resize(images, windows, size, sizes=sizes, layout=layout, scale=1.0 / 255.0)


finish_view = photometric  # the name `Augmenter` calls both implementations' by (`viewpipe.torch_ops.finish_view`)
