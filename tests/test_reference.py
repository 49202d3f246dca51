"""What only the reference loader (PIL + DataLoader) has: any source path opened as a source, its workers
stopped by close(), undecodable files with and without workers, `decode_rgb` (viewpipe.formats, the PIL decode of every
loader and trainer). The loader contract every
backend meets (shapes, windows and pixels, the same plan as DALI and FFCV, live updates, companions, ranks,
order, reproducible views, resume) is tests/test_backends.py."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import build, plain_augment
from viewpipe.augment import preset
from viewpipe.errors import ViewpipeError
from viewpipe.formats import decode_rgb
from viewpipe.pipelines import LoaderConfig
from viewpipe.pipelines.reference import ReferenceLoader, ReferenceLoader
from viewpipe.sources import FolderSource

S = 32
PLAIN = plain_augment(S)


def _cfg(**kw) -> LoaderConfig:
    base = LoaderConfig(views=2, batch_size=8, augment=preset("mocov2", size=S), workers=0, seed=3)
    return replace(base, **kw)


def test_a_path_is_opened_as_a_source(image_folder: Path) -> None:
    """An image folder given as a path is read as a `FolderSource` (sizes from the headers): without drop_last
    every sample once, the last batch smaller."""
    loader = build(ReferenceLoader, str(image_folder), _cfg(batch_size=10, drop_last=False, augment=PLAIN))
    assert isinstance(loader, ReferenceLoader) and isinstance(loader.source, FolderSource)
    got = list(loader)
    assert [len(b[2]) for b in got] == [10] * 9 + [6]
    assert sorted(i for b in got for i in b[2].tolist()) == list(range(96))
    assert got[-1].windows.shape == (6, 2, 4) and got[-1].windows.dtype == torch.int32


def test_close_stops_the_workers(image_folder: Path) -> None:
    """close() stops the persistent workers now; a later iteration starts new ones where the consumer was."""
    loader = build(ReferenceLoader, image_folder, _cfg(workers=2, augment=PLAIN))
    head = [b for _, b in zip(range(5), loader)]
    assert loader._loader._iterator is not None
    loader.close()
    assert loader._loader._iterator is None
    rest = list(loader)
    assert [b.indices.tolist() for b in head + rest] == [x.tolist() for x in loader.batches(0)]
    loader.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_does_not_decode_is_named_and_replaced(image_folder: Path, tmp_path: Path, workers: int,
                                                           capfd: pytest.CaptureFixture) -> None:
    """As in the DALI and FFCV backends: the sample is replaced by the next one for the rest of the run, named
    once on stderr, kept in `decode_failures` (and the state dict); the epoch runs to its end."""
    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    bad = FolderSource(root).paths[17]
    Path(bad).write_bytes(b"not an image")
    loader = build(ReferenceLoader, root, _cfg(workers=workers, augment=PLAIN, drop_last=False))
    seen = [k for batch in loader for k in batch[2].tolist()]
    err = capfd.readouterr().err
    assert err.count("fails to decode") == 1 and Path(bad).name in err and "replaced by sample 18" in err
    assert list(loader.decode_failures) == [17] and loader.state_dict()["decode_failures"] == loader.decode_failures
    assert 17 not in seen and seen.count(18) == 2 and len(seen) == len(FolderSource(root))


def test_decode_rgb_converts_and_reports() -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 4), 128).save(buf, format="PNG")
    assert decode_rgb(buf.getvalue(), "g.png").mode == "RGB"
    buf = io.BytesIO()
    Image.new("CMYK", (5, 4), (0, 255, 0, 0)).save(buf, format="JPEG")
    img = decode_rgb(buf.getvalue(), "cmyk.jpg")
    assert img.mode == "RGB" and img.getpixel((0, 0))[0] > 200  # magenta-ish: red is high
    with pytest.raises(ViewpipeError, match=r"bad\.jpg: cannot decode image"):
        decode_rgb(b"not an image", "bad.jpg")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    with pytest.raises(ViewpipeError, match=r"cut\.jpg: cannot decode image"):
        decode_rgb(good.getvalue()[:200], "cut.jpg")
