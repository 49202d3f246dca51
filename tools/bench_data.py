"""`viewpipe bench --make-data DIR`: benchmark JPEGs at ImageNet's sizes, made from the images at hand.

Small JPEGs (224 px Imagenette, 32 px CIFAR) decode several times faster than ImageNet's natural-size ones
(about 110–200 kpx, most 500×375 or 375×500), so speed figures measured on them are not ImageNet figures.
This writes an ImageNet-style folder (`DIR/<class>/<i>.jpg`) whose images are resized to sizes drawn from a
distribution close to ImageNet's (the common 4:3, 3:4 and 3:2 frames at 500 px, a spread of others), with
Gaussian noise (σ 4 levels) that puts back some of the entropy an upscale removes, at JPEG quality 90."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from viewpipe.errors import ViewpipeError

# (height, width, weight): ImageNet's frequent frames, then a spread of others
SIZES = ((375, 500, 0.40), (500, 375, 0.15), (333, 500, 0.15), (500, 333, 0.05), (400, 500, 0.05),
         (480, 640, 0.05), (300, 451, 0.05), (500, 500, 0.04), (256, 340, 0.03), (800, 600, 0.03))


def make_natural(src: Path, dst: Path, count: int, split: str = "train", seed: int = 0) -> Path:
    """Write `count` natural-size JPEGs made from the images of `src` (an image folder or a .npz JPEG
    collection, cycled) into the class folders of `dst`; returns `dst`. An existing complete folder is kept."""
    from PIL import Image
    from tqdm import tqdm

    from viewpipe.sources import open_source

    if count < 1:
        raise ViewpipeError(f"--make-count must be at least 1, got {count}")
    done = dst / ".complete"
    if done.is_file() and int(done.read_text() or 0) == count:
        return dst
    source = open_source(src, split)
    rng = np.random.default_rng(seed)
    frames = np.array([s[:2] for s in SIZES])
    picks = rng.choice(len(SIZES), size=count, p=np.array([s[2] for s in SIZES]) / sum(s[2] for s in SIZES))
    for i in tqdm(range(count), desc="natural-size JPEGs", unit="img", disable=None):
        k = i % len(source)
        h, w = frames[picks[i]].tolist()
        img = Image.open(io.BytesIO(source.read(k))).convert("RGB").resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 4.0, (h, w, 3))
        folder = dst / f"c{int(source.labels[k]):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:07d}.jpg", quality=90)
    done.write_text(str(count))
    return dst
