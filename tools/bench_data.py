"""`viewpipe bench --make-data DIR`: benchmark JPEGs at ImageNet's sizes and entropy, made from the images at hand.

Small JPEGs (224 px Imagenette, 32 px CIFAR) decode several times faster than ImageNet's natural-size ones
(about 110–200 kpx, most 500×375 or 375×500), so speed figures measured on them are not ImageNet figures.
This writes an ImageNet-style folder (`DIR/<class>/<i>.jpg`) whose images are resized to sizes drawn from a
distribution close to ImageNet's (the common 4:3, 3:4 and 3:2 frames at 500 px, a spread of others), at JPEG
quality 90, with Gaussian noise that puts back the entropy an upscale removes. A decoder's cost follows the
entropy it decodes, which the file size measures: the noise's σ is calibrated on the images at hand so that the
files carry ImageNet's bytes per pixel (its training set: 1,281,167 JPEGs, 147.9 GB, of 469×387 px on average:
0.63 bytes per pixel). `DIR/natural.json` records the σ, the sizes and the bytes written."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from viewpipe.errors import ViewpipeError

# (height, width, weight): ImageNet's frequent frames, then a spread of others
SIZES = ((375, 500, 0.40), (500, 375, 0.15), (333, 500, 0.15), (500, 333, 0.05), (400, 500, 0.05),
         (480, 640, 0.05), (300, 451, 0.05), (500, 500, 0.04), (256, 340, 0.03), (800, 600, 0.03))
QUALITY = 90
IMAGENET_BYTES_PER_PIXEL = 147_897_477_120 / 1_281_167 / (469 * 387)  # ≈ 0.636
CALIBRATION_IMAGES = 8


def _upscaled(data: bytes, h: int, w: int) -> np.ndarray:
    """An encoded image decoded and resized (bicubic) to h × w, as float32 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)


def _encoded(x: np.ndarray, sigma: float, rng: np.random.Generator) -> bytes:
    """`x` with Gaussian noise of σ `sigma` grey levels, as a quality-90 JPEG."""
    from PIL import Image

    noisy = x + rng.normal(0.0, sigma, x.shape).astype(np.float32) if sigma else x
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def calibrate_noise(images: list[np.ndarray], target: float = IMAGENET_BYTES_PER_PIXEL, seed: int = 0) -> float:
    """The σ whose noisy JPEGs of `images` carry `target` bytes per pixel on average (bisection; the size grows
    with σ). 0 when the images already carry more; 64 grey levels at most."""
    def bpp(sigma: float) -> float:
        rng = np.random.default_rng(seed)
        return float(np.mean([len(_encoded(x, sigma, rng)) / (x.shape[0] * x.shape[1]) for x in images]))

    lo, hi = 0.0, 64.0
    if bpp(lo) >= target:
        return 0.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bpp(mid) < target else (lo, mid)
    return round((lo + hi) / 2, 2)


def make_natural(src: Path, dst: Path, count: int, split: str = "train", seed: int = 0, workers: int = 1) -> Path:
    """Write `count` natural-size JPEGs made from the images of `src` (an image folder or a .npz JPEG
    collection, cycled) into the class folders of `dst`, on `workers` processes (the same files for any number);
    returns `dst`. An existing complete folder is kept."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from viewpipe.sources import open_source

    if count < 1:
        raise ViewpipeError(f"--make-count must be at least 1, got {count}")
    report = dst / "natural.json"
    if report.is_file() and json.loads(report.read_text()).get("count") == count:
        return dst
    source = open_source(src, split)
    frames = np.array([s[:2] for s in SIZES])
    weights = np.array([s[2] for s in SIZES]) / sum(s[2] for s in SIZES)
    sizes = frames[np.random.default_rng(seed).choice(len(SIZES), size=count, p=weights)]
    probe = [_upscaled(source.read(k % len(source)), 375, 500) for k in range(min(CALIBRATION_IMAGES, count))]
    sigma = calibrate_noise(probe, seed=seed)
    chunks = [range(i, min(i + 64, count)) for i in range(0, count, 64)]
    job = _Writer(source, dst, sizes, sigma, seed)
    with ProcessPoolExecutor(max(1, workers)) as pool, tqdm(total=count, unit="img", disable=None,
                                                             desc=f"natural-size JPEGs (noise σ {sigma})") as bar:
        written = 0
        for n, size in zip(chunks, pool.map(job, chunks)):
            written += size
            bar.update(len(n))
    report.write_text(json.dumps(summary(count, sigma, written, sizes), indent=1))
    return dst


class _Writer:
    """Writes images `i` of a chunk (picklable for the worker processes); image i's noise is drawn from its
    own generator (seed, i), so the files do not depend on the chunking."""

    def __init__(self, source: Any, dst: Path, sizes: np.ndarray, sigma: float, seed: int) -> None:
        self.source, self.dst, self.sizes, self.sigma, self.seed = source, dst, sizes, sigma, seed

    def __call__(self, chunk: range) -> int:
        written = 0
        for i in chunk:
            k = i % len(self.source)
            h, w = self.sizes[i].tolist()
            folder = self.dst / f"c{int(self.source.labels[k]):03d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = _encoded(_upscaled(self.source.read(k), h, w), self.sigma, np.random.default_rng([self.seed, i]))
            (folder / f"{i:07d}.jpg").write_bytes(data)
            written += len(data)
        return written


def summary(count: int, sigma: float, written: int, sizes: np.ndarray) -> dict[str, Any]:
    """What `natural.json` says of a written folder."""
    pixels = int(sizes.prod(axis=1).sum())
    frames, counts = np.unique(sizes, axis=0, return_counts=True)
    return {"count": count, "quality": QUALITY, "noise_sigma": sigma, "bytes": written,
            "bytes_per_pixel": written / pixels, "target_bytes_per_pixel": IMAGENET_BYTES_PER_PIXEL,
            "mean_pixels": pixels / count,
            "frames": {f"{h}x{w}": int(n) for (h, w), n in zip(frames.tolist(), counts.tolist())}}
