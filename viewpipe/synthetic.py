"""Generated images with known object boxes: the default data of `viewpipe bench` and the demo.

Each image is a cluttered background (random small rectangles and noise) with one larger coloured object
whose shape and colour give its class. Images are written as JPEGs in an ImageNet-style folder, with the
true object boxes beside them (`boxes.npy`, normalised (h0, w0, h1, w1), in the folder source's order),
so that learned ContrastiveCrop boxes can be scored against the truth.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

_SHAPES = ("square", "disc", "cross")
_COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40))


def class_names() -> list[str]:
    return [f"{s}_{i}" for s in _SHAPES for i in range(len(_COLOURS))]


def render(rng: np.random.Generator, label: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image of class `label` and its object box (h0, w0, h1, w1) normalised."""
    H, W = size
    img = rng.integers(60, 196, size=3).astype(np.float32) + rng.normal(0, 12, size=(H, W, 3))
    for _ in range(12):  # clutter
        h, w = rng.integers(H // 16, H // 5), rng.integers(W // 16, W // 5)
        t, l = rng.integers(0, H - h), rng.integers(0, W - w)
        img[t : t + h, l : l + w] = rng.integers(0, 256, size=3)
    shape, colour = divmod(label, len(_COLOURS))
    oh, ow = int(H * rng.uniform(0.25, 0.5)), int(W * rng.uniform(0.25, 0.5))
    top, left = int(rng.integers(0, H - oh)), int(rng.integers(0, W - ow))
    yy, xx = np.mgrid[0:oh, 0:ow]
    cy, cx = (oh - 1) / 2, (ow - 1) / 2
    if _SHAPES[shape] == "square":
        mask = np.ones((oh, ow), dtype=bool)
    elif _SHAPES[shape] == "disc":
        mask = ((yy - cy) / (oh / 2)) ** 2 + ((xx - cx) / (ow / 2)) ** 2 <= 1.0
    else:
        mask = (np.abs(yy - cy) < oh / 6) | (np.abs(xx - cx) < ow / 6)
    patch = img[top : top + oh, left : left + ow]
    patch[mask] = np.asarray(_COLOURS[colour], dtype=np.float32) + rng.normal(0, 8, size=(int(mask.sum()), 3))
    box = np.array([top / H, left / W, (top + oh) / H, (left + ow) / W], dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), box


def make_folder(
    root: str | os.PathLike[str],
    n: int = 1200,
    size_range: tuple[int, int] = (160, 320),
    seed: int = 0,
    quality: int = 90,
    progress: bool = False,
) -> Path:
    """Write n JPEGs of varied sizes into root/<class>/<i>.jpg and their true boxes into root/boxes.npy."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = class_names()
    labels = np.arange(n) % len(names)
    entries = []
    from tqdm import tqdm

    for i, label in enumerate(tqdm(labels, desc="generating images", unit="img", disable=not progress or None)):
        size = tuple(int(s) for s in rng.integers(size_range[0], size_range[1] + 1, size=2))
        img, box = render(rng, int(label), size)  # type: ignore[arg-type]
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        name = f"{i:06d}.jpg"
        (folder / name).write_bytes(buf.getvalue())
        entries.append((names[label], name, box))
    # boxes in the order a FolderSource lists the files: sorted class folders, then sorted file names
    entries.sort(key=lambda e: (e[0], e[1]))
    np.save(root / "boxes.npy", np.stack([e[2] for e in entries]))
    return root
