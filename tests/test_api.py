"""The Python front door: `from viewpipe import make_loader, Augmenter, ViewTransform`, typed, light to import,
each docstring's example run as written; the per-sample transform's crops, seeds and DataLoader workers."""

from __future__ import annotations

import doctest
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import viewpipe
from conftest import plain_augment, run_python
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError


def test_import_viewpipe_is_light_and_every_name_resolves() -> None:
    res = run_python("""
        import sys, viewpipe
        print('torch' in sys.modules, sorted(set(viewpipe.__all__) - set(dir(viewpipe))))
        """, cwd="/")
    assert res.returncode == 0 and res.stdout.split() == ["False", "[]"], res.stderr
    for name in viewpipe.__all__:
        assert getattr(viewpipe, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        viewpipe.nope  # noqa: B018
    hints = inspect.signature(viewpipe.make_loader).parameters
    assert all(p.annotation is not inspect.Parameter.empty for p in hints.values())  # typed, no **kwargs
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in hints.values())
    assert (Path(viewpipe.__file__).parent / "py.typed").is_file()


def front_door_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = [t for name in ("make_loader", "Augmenter", "ViewTransform")
             for t in finder.find(getattr(viewpipe, name), name) if t.examples]
    assert {t.name.split(".")[0] for t in tests} == {"make_loader", "Augmenter", "ViewTransform"}
    return tests


@pytest.mark.parametrize("test", front_door_examples(), ids=lambda t: t.name)
def test_docstring_examples_run_as_written(test: doctest.DocTest, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example runs in a folder holding `data/train`, a small generated image folder."""
    from viewpipe.synthetic import make_folder

    make_folder(tmp_path / "data" / "train", n=16, size_range=(40, 64), seed=3)
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=lambda text: pytest.fail(text, pytrace=False))
    assert result.failed == 0 and result.attempted >= 3


def halves(height: int = 60, width: int = 80) -> torch.Tensor:
    """An image black on its left half and white on its right."""
    x = torch.zeros(3, height, width, dtype=torch.uint8)
    x[:, :, width // 2 :] = 255
    return x


def test_a_box_keeps_the_crops_inside_it() -> None:
    """Small crops (2–5 % of the area) centred by the box (the right 30 %) see white; without a box, the crops
    are RandomResizedCrop's, about half of them on the black side."""
    from viewpipe import ViewTransform

    t = ViewTransform(plain_augment(16), views=4, crop=CropConfig(scale=(0.02, 0.05)), seed=0)
    img = halves()
    boxed = torch.stack([v for _ in range(50) for v in t(img, box=(0.0, 0.7, 1.0, 1.0))])
    free = torch.stack([v for _ in range(50) for v in t(img)])
    white = lambda views: (views.mean(dim=(1, 2, 3)) > 0.5).float().mean()  # noqa: E731  (plain: values in [0, 1])
    assert white(boxed) == 1.0
    assert 0.35 < white(free) < 0.65


def test_seeds_are_reproducible_and_workers_draw_their_own() -> None:
    from viewpipe import ViewTransform

    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    a, b = ViewTransform("mocov2", size=24, seed=7), ViewTransform("mocov2", size=24, seed=7)
    first = [torch.stack(a(img)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, [torch.stack(b(img)) for _ in range(3)]))
    assert not torch.equal(first[0], first[1])  # a new draw per call
    assert not torch.equal(first[0], torch.stack(ViewTransform("mocov2", size=24, seed=8)(img)))

    class Same(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.stack(a(img))

    batches = list(torch.utils.data.DataLoader(Same(), batch_size=2, num_workers=2))
    assert not torch.equal(batches[0][0], batches[1][0])  # worker 0's first sample ≠ worker 1's


def test_inputs_a_user_has() -> None:
    """PIL (RGB, grayscale), NumPy HWC, float tensors in [0, 1], in a torchvision v2 Compose."""
    from PIL import Image
    from torchvision.transforms import v2

    from viewpipe import ViewTransform

    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    t = ViewTransform("byol", size=16, seed=0)
    for image in (Image.fromarray(arr), Image.fromarray(arr[..., 0]), arr, torch.rand(3, 30, 40)):
        q, k = v2.Compose([v2.ToImage(), t])(image)
        assert q.shape == k.shape == (3, 16, 16) and q.dtype == torch.float32 and torch.isfinite(q).all()
    with pytest.raises(ValueError, match="expected an image"):
        t(torch.zeros(2, 5, 30, 40))


def test_make_loader_groups_boxes_and_errors(image_folder: Path, state_name: str) -> None:
    """Multi-crop groups from the shorthand; a SampleState's boxes steer the crops; a bad backend is one line."""
    from viewpipe import SampleState, make_loader

    loader = make_loader(image_folder, "torch", batch_size=8, views="2x32,2x16@0.05-0.2", device="cpu", workers=0)
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert batch.windows.shape == (8, 4, 4)
    area = sizes_of(image_folder, batch.indices).prod(1)[:, None]
    w = batch.windows.numpy().astype(np.float64)
    assert (w[:, 2:, 2] * w[:, 2:, 3] / area <= 0.2 + 0.05).all()  # the small group's scale (rounding slack)
    assert (w[:, :2, 2] * w[:, :2, 3] / area >= 0.2 - 0.05).all()
    with SampleState.create(96, name=state_name) as state:
        state.set_boxes(np.tile(np.float32([0.0, 0.0, 0.25, 0.25]), (96, 1)), epoch=0)
        boxed = next(iter(make_loader(image_folder, "torch", batch_size=8, size=32, scale=(0.02, 0.05),
                                      state=state, device="cpu", workers=0)))
    w = boxed.windows.numpy()
    centre_row = (w[..., 0] + w[..., 2] / 2) / sizes_of(image_folder, boxed.indices)[:, None, 0]
    assert (centre_row < 0.25 + 0.1).all()  # centres in the top-left quarter (a half-window of slack)
    with pytest.raises(ViewpipeError, match="unknown backend 'nope'; available: "):
        make_loader(image_folder, "nope")


def sizes_of(folder: Path, indices: torch.Tensor) -> np.ndarray:
    """(B, 2) float (height, width) of a folder's samples."""
    from viewpipe.sources import ImageSizes, open_source

    sizes, rows = ImageSizes(open_source(folder)), indices.numpy()
    assert not sizes.check(rows)
    return sizes(rows).astype(np.float64)
