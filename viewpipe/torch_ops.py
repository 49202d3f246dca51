"""The augmentation as plain torch ops, on any device: the reference the fused kernels are held to, and the
CPU path. One call of each step covers a batch; per-sample parameters come as `ViewParams`.

- `crop_views` / `crop_resize`: crop-and-resize from per-sample windows with `torchvision.ops.roi_align`
  (bilinear samples averaged over each output pixel's footprint: an antialiased resize).
- `finish_view` / `photometric`: flip, colour jitter with torchvision's semantics in each sample's own order,
  grayscale, Gaussian blur with each sample's σ, solarize, then normalisation.

`crop_views` and `finish_view` take the same arguments as `viewpipe.fused`'s and give the same views within
float rounding; `Augmenter` (`viewpipe.augment`) chooses between the two.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from viewpipe.augment_params import GRAY, ViewAugment, ViewParams, is_hwc


# ---------------------------------------------------------------------------- layout and crops
def to_nchw(images: torch.Tensor | Sequence[torch.Tensor], layout: str = "auto") -> torch.Tensor:
    """A uint8 batch (N,H,W,3) / (N,3,H,W), or a list of (H,W,3) / (3,H,W) images of different sizes,
    as one float (N,3,H,W) tensor in [0, 255]; smaller images are edge-padded to the largest."""
    if isinstance(images, torch.Tensor):
        x = images
        if is_hwc(x.shape[1:], layout):
            x = x.permute(0, 3, 1, 2)
        return x.float()
    items = [im.permute(2, 0, 1) if is_hwc(im.shape, layout) else im for im in images]
    H, W = max(im.shape[1] for im in items), max(im.shape[2] for im in items)
    out = torch.empty((len(items), 3, H, W), dtype=torch.float32, device=items[0].device)
    for n, im in enumerate(items):
        h, w = im.shape[1:]
        out[n, :, :h, :w] = im
        out[n, :, h:, :w] = out[n, :, h - 1 : h, :w]  # replicate the last row and column, so that
        out[n, :, :, w:] = out[n, :, :, w - 1 : w]  # bilinear samples at the border never see padding
    return out


def crop_views(images: torch.Tensor, windows: torch.Tensor | np.ndarray, size: int, *,
               sizes: torch.Tensor | np.ndarray | None = None, layout: str = "auto") -> torch.Tensor:
    """`crop_resize` of a uint8 batch in `layout`, in [0, 1]: (V·N, 3, size, size) float32, view-major. `sizes`
    (N, 2): each image's own (height, width) inside a padded batch, its edge extended over the padding."""
    x = to_nchw(images, layout)
    if sizes is not None:  # each image's edge extends it over the padding, as the fused path reads it
        x = x.clone()
        for n, (h, w) in enumerate(torch.as_tensor(sizes).tolist()):
            x[n, :, h:, :w] = x[n, :, h - 1 : h, :w]
            x[n, :, :, w:] = x[n, :, :, w - 1 : w]
    return crop_resize(x, torch.as_tensor(windows), size).div_(255.0).clamp_(0, 1)


def crop_resize(images: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (top, left, height, width) of `images` (N,3,H,W float), windows (N,V,4), resized to size×size.
    Returns (V·N, 3, size, size) ordered view-major (all samples' view 0, then view 1, ...). roi_align indexes
    its input with 32-bit integers, so a batch of large images goes through it in chunks of samples."""
    import torchvision.ops

    N, V = windows.shape[:2]
    win = windows.to(device=images.device, dtype=torch.float32).transpose(0, 1).reshape(V * N, 4)
    idx = torch.arange(N, device=images.device, dtype=torch.float32).repeat(V)
    top, left, h, w = win.unbind(1)
    rois = torch.stack([idx, left, top, left + w, top + h], dim=1)
    per_image = max(1, images[0].numel()) if N else 1
    chunk = max(1, (2**31 - 1) // per_image)
    if N <= chunk:
        return torchvision.ops.roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                                         aligned=True)
    out = images.new_empty((V * N, images.shape[1], size, size))
    for lo in range(0, N, chunk):
        sel = torch.cat([torch.arange(lo, min(N, lo + chunk)) + v * N for v in range(V)]).to(images.device)
        part = rois[sel].clone()
        part[:, 0] -= lo
        out[sel] = torchvision.ops.roi_align(images[lo : lo + chunk].contiguous(), part, (size, size),
                                             spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out


def resized_centre(sizes: np.ndarray, size: int, resize: int) -> np.ndarray:
    """(N, 4) int64 (resized height, resized width, top, left) of torchvision's Resize(resize) +
    CenterCrop(size) for images of `sizes` (N, 2): the shorter side to `resize`, the longer to
    `int(resize · long / short)`, the crop at `round((side - size) / 2)`."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    H, W = sizes[:, 0], sizes[:, 1]
    short = np.minimum(H, W)
    rh = np.where(H <= W, resize, (resize * H / short).astype(np.int64))
    rw = np.where(W <= H, resize, (resize * W / short).astype(np.int64))
    return np.stack([rh, rw, np.round((rh - size) / 2), np.round((rw - size) / 2)], 1).astype(np.int64)


def resize_windows(images: torch.Tensor, windows: torch.Tensor | np.ndarray, size: int, layout: str = "auto",
                   resize: int = 0) -> torch.Tensor:
    """One window (top, left, h, w) per uint8 image (N,H,W,3) / (N,3,H,W) (windows (N, 4)) resized to
    size×size as PIL's bilinear resize does it (a triangle filter widened when shrinking: torch's antialiased
    bilinear; rounded to uint8), or with `resize` > 0 resized by `resized_centre`'s rule and its centre
    size×size kept; image by image on the images' device: (N, 3, size, size) uint8. How clean views are made
    (no random crop), so that a pass over the dataset sees what PIL would give it."""
    x = images.permute(0, 3, 1, 2) if is_hwc(images.shape[1:], layout) else images  # (uint8 kept)
    windows = torch.as_tensor(windows).reshape(-1, 4).tolist()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8, device=x.device)
    for n, (top, left, h, w) in enumerate(windows):
        rh, rw, y, x0 = resized_centre(np.array([h, w]), size, resize)[0].tolist() if resize else (size, size, 0, 0)
        crop = x[n : n + 1, :, top : top + h, left : left + w]
        # uint8 on the CPU (torch's port of Pillow's kernels, on channels_last), float elsewhere
        crop = crop.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else crop.float()
        full = F.interpolate(crop, (rh, rw), mode="bilinear", antialias=True, align_corners=False)[0]
        out[n] = full[:, y : y + size, x0 : x0 + size].round().clamp_(0, 255) if full.is_floating_point() else \
            full[:, y : y + size, x0 : x0 + size]
    return out


# ---------------------------------------------------------------------------- photometric ops (float in [0,1])
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n,3,H,W) → (n,1,H,W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = _bcast(ratio)
    return (r * a + (1 - r) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _bcast(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by f ∈ [-0.5, 0.5] (a fraction of the circle), through HSV as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * fr)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - fr))).clamp(0.0, 1.0)
    # the six HSV sectors pick (r, g, b) from (v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q):
    # selected in place rather than stacked into a (n, 3, 6, H, W) tensor
    r2 = torch.where(i == 0, v, torch.where(i == 1, q, torch.where(i < 4, p, torch.where(i == 4, t, v))))
    g2 = torch.where(i == 0, t, torch.where(i < 3, v, torch.where(i == 3, q, p)))
    b2 = torch.where(i < 2, p, torch.where(i == 2, t, torch.where(i < 5, v, q)))
    return torch.stack((r2, g2, b2), dim=1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur (separable, reflect padding, torchvision's kernel) of (n,C,H,W)."""
    n, c, H, W = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma.to(x)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, H, W)


def _apply(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """x[mask] = fn(x[mask], *args[mask]) with the mask on the CPU (no device synchronisation)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    dev = idx.to(x.device, non_blocking=True)
    x.index_copy_(0, dev, fn(x.index_select(0, dev), *(a[idx].to(x.device, non_blocking=True) for a in args)))
    return x


def photometric(x: torch.Tensor, p: ViewParams, cfg: ViewAugment, kernel_size: int) -> torch.Tensor:
    """Apply one view's flip, jitter (in each sample's order), grayscale, blur and solarize to (n,3,H,W) in [0,1]."""
    x = _apply(x, p.flip, lambda v: v.flip(-1))
    for stage in range(4):
        for op in range(4):
            if cfg.jitter[op] > 0:
                x = _apply(x, p.jitter & (p.order[:, stage] == op), _JITTER_OPS[op], p.factors[:, op])
    x = _apply(x, p.gray, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    x = _apply(x, p.blur, lambda v, s: gaussian_blur(v, s, kernel_size), p.sigma)
    t = cfg.solarize_threshold
    return _apply(x, p.solarize, lambda v: torch.where(v >= t, 1.0 - v, v))


def finish_view(x: torch.Tensor, p: ViewParams, cfg: ViewAugment, kernel_size: int,
                mean: tuple[float, float, float], std: tuple[float, float, float], *, layout: str = "chw",
                out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """`photometric` then normalisation of one view, x (N,3,H,W) or (N,H,W,3) with layout="hwc", uint8 or float
    in [0, 1] (a float input may be changed in place): (N,3,H,W) of `out_dtype`, channels_last when asked."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if layout == "hwc":
        x = x.permute(0, 3, 1, 2)
    scale = 1.0  # of x's levels: 255 while a uint8 view needs no photometric step (normalised in one pass)
    if x.dtype == torch.uint8:
        x, scale = x.contiguous(memory_format=fmt).float(), 255.0
        if _draws_any(p):
            x, scale = x.div_(255.0), 1.0
    y = photometric(x, p, cfg, kernel_size)
    m, s = (torch.tensor(v, device=y.device).view(1, 3, 1, 1) for v in (mean, std))
    y = torch.addcmul(-m / s, y, 1 / (scale * s)).to(out_dtype)
    return y.contiguous(memory_format=fmt)


def _draws_any(p: ViewParams) -> bool:
    """Whether any sample of a view has a photometric step drawn (else `photometric` is the identity)."""
    return bool(p.flip.any() or p.jitter.any() or p.gray.any() or p.blur.any() or p.solarize.any())
