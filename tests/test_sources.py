"""Sources: ImageFolder order and labels, .npz collections (memory-mapped), clear errors."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.sources import FolderSource, NpzSource, open_source


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_folder_source_matches_torchvision_imagefolder(image_folder) -> None:
    from torchvision.datasets import ImageFolder

    src = FolderSource(image_folder)
    ref = ImageFolder(str(image_folder))
    assert src.classes == ref.classes
    assert src.paths == [p for p, _ in ref.samples]
    np.testing.assert_array_equal(src.labels, ref.targets)
    assert src.read(3) == open(ref.samples[3][0], "rb").read()


def test_folder_errors(tmp_path) -> None:
    with pytest.raises(ViewpipeError, match="no such file or folder"):
        FolderSource(tmp_path / "missing")
    with pytest.raises(ViewpipeError, match="no class folders"):
        FolderSource(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(ViewpipeError, match="no image files"):
        FolderSource(tmp_path)
    (tmp_path / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    src = FolderSource(tmp_path)
    with pytest.raises(ViewpipeError, match=r"gone\.jpg: cannot read"):
        src.read(0)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_source(tmp_path, compressed: bool) -> None:
    files = [_jpeg((255, 0, 0)), _jpeg((0, 255, 0), (5, 9)), _jpeg((0, 0, 255))]
    offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    arrays = {
        "train_jpeg": np.frombuffer(b"".join(files), np.uint8),
        "train_offsets": offsets,
        "train_labels": np.array([2, 0, 1], np.int64),
        "train_src_path": np.array([b"a/x.jpg", b"b/y.jpg", b"c/z.jpg"]),
        "class_names": np.array(["zero", "one", "two"]),
    }
    path = tmp_path / "c.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    src = open_source(path)
    assert isinstance(src, NpzSource) and len(src) == 3
    assert src.classes == ["zero", "one", "two"]
    assert [src.read(i) for i in range(3)] == files
    np.testing.assert_array_equal(src.labels, [2, 0, 1])
    assert "b/y.jpg" in src.describe(1)
    if not compressed:
        assert isinstance(src.jpeg, np.memmap), "stored members are memory-mapped, not copied"
    again = pickle.loads(pickle.dumps(src))
    assert again.read(2) == files[2]
    with pytest.raises(ViewpipeError, match="no split 'val'.*splits: \\['train'\\]"):
        NpzSource(path, "val")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ViewpipeError, match="not a readable .npz"):
        NpzSource(tmp_path / "bad.npz")


def test_shared_npz_collections_open() -> None:
    """The real collections in ../shared/data open as sources (when present beside the checkout)."""
    from conftest import REPO

    path = REPO.parent / "shared" / "data" / "cifar10_jpeg" / "cifar10_jpeg.npz"
    if not path.exists():
        pytest.skip("../shared/data is not beside this checkout")
    src = NpzSource(path, "test")
    assert len(src) == 10_000 and src.classes[0] == "airplane"
    img = Image.open(io.BytesIO(src.read(0)))
    assert img.size == (32, 32)


def test_import_optional_names_the_extra() -> None:
    assert import_optional("json", "dev").dumps([1]) == "[1]"
    with pytest.raises(ViewpipeError, match=r"pip install 'viewpipe\[dali\]'"):
        import_optional("viewpipe_no_such_module", "dali", "NVIDIA DALI")


def test_shard_source_reads_a_converted_dataset(image_folder, tmp_path) -> None:
    """`open_source` on a converted folder gives its shards: the original bytes (JPEGs are kept as they
    are), labels and sizes from the index, descriptions naming the shard, and it pickles without its maps."""
    from viewpipe.formats import shard_paths
    from viewpipe.sources import ShardSource
    from viewpipe.convert import convert

    convert(image_folder, tmp_path / "ds", formats=("dali",), workers=1, shard_size=40)
    folder, shards = FolderSource(image_folder), open_source(tmp_path / "ds")
    assert isinstance(shards, ShardSource) and len(shards) == len(folder)
    np.testing.assert_array_equal(shards.labels, folder.labels)
    assert shards.classes == folder.classes
    for k in (0, 41, len(folder) - 1):
        assert shards.read(k) == folder.read(k)
        assert shards.view(k).tobytes() == folder.read(k)
        with Image.open(io.BytesIO(folder.read(k))) as img:
            assert tuple(shards.sizes[k]) == (img.height, img.width)
    assert str(shard_paths(tmp_path / "ds", 1)[0]) in shards.describe(41) and "sample 41" in shards.describe(41)
    clone = pickle.loads(pickle.dumps(shards))
    assert clone.read(50) == folder.read(50)
    shards.close()
    with pytest.raises(ViewpipeError, match="no DALI shards"):
        convert(image_folder, tmp_path / "ffcv-only", formats=("ffcv",), workers=1)
        ShardSource(tmp_path / "ffcv-only")
