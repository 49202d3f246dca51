"""Unlabelled image folders (a flat folder, or any tree read with labelled=False): opened as sources with label -1
and no classes, converted, pretrained on with the torch backend; kNN and the linear probe refuse them in one line."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from viewpipe.errors import ViewpipeError
from viewpipe.sources import UNLABELLED, FolderSource, ShardSource, is_labelled, open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flat_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n generated JPEGs of varied sizes directly in `root` (no class folders), plus a non-image file."""
    from PIL import Image

    from viewpipe.synthetic import render

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = tuple(int(s) for s in rng.integers(32, 64, size=2))
        img, _ = render(rng, i % 3, size)  # type: ignore[arg-type]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        (root / f"img_{i:03d}.jpg").write_bytes(buf.getvalue())
    (root / "README.txt").write_text("holiday photos")
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flat_folder(tmp_path_factory.mktemp("flat") / "photos", 24)


def test_a_flat_folder_is_an_unlabelled_source(flat: Path) -> None:
    src = open_source(flat)
    assert isinstance(src, FolderSource) and not src.labelled and not is_labelled(src)
    assert src.classes == [] and src.stray == []
    assert src.paths == [str(flat / f"img_{i:03d}.jpg") for i in range(24)]  # sorted; README.txt is no image
    assert src.labels.dtype == np.int64 and (src.labels == UNLABELLED).all()
    assert src.read(0) == (flat / "img_000.jpg").read_bytes()
    with pytest.raises(ViewpipeError, match="no class folders; expected root/<class>/<image>"):
        FolderSource(flat, labelled=True)  # labels asked for


def test_a_tree_without_class_structure(tmp_path: Path, flat: Path, image_folder: Path) -> None:
    # any tree read with labelled=False: every image below the root, in os.walk's sorted order
    tree = tmp_path / "tree"
    (tree / "2019" / "summer").mkdir(parents=True)
    (tree / "2020").mkdir()
    for i, rel in enumerate(["top.jpg", "2019/a.jpg", "2019/summer/b.jpg", "2020/c.jpg"]):
        (tree / rel).write_bytes((flat / f"img_{i:03d}.jpg").read_bytes())
    src = FolderSource(tree, labelled=False)
    assert [Path(p).relative_to(tree).as_posix() for p in src.paths] == [
        "top.jpg", "2019/a.jpg", "2019/summer/b.jpg", "2020/c.jpg"]
    assert not is_labelled(src) and src.classes == []
    # by default sub-folders are class folders, as in torchvision's ImageFolder (the top image is stray)
    labelled = FolderSource(tree)
    assert labelled.classes == ["2019", "2020"] and labelled.labels.tolist() == [0, 0, 1]
    assert labelled.stray == [str(tree / "top.jpg")] and is_labelled(labelled)
    assert is_labelled(FolderSource(image_folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ViewpipeError, match="no class folders and no image files"):
        FolderSource(empty)


def test_a_flat_folder_converts_to_an_unlabelled_dataset(tmp_path: Path, flat: Path) -> None:
    from viewpipe.convert import convert  # the conversion library (`viewpipe convert`)

    dst = tmp_path / "ds"
    convert(flat, dst, formats=("dali", "ffcv"), workers=1, shard_size=16)
    src = open_source(dst)
    assert isinstance(src, ShardSource) and not is_labelled(src) and src.classes == []
    assert len(src) == 24 and (src.labels == UNLABELLED).all()
    assert src.read(5) == (flat / "img_005.jpg").read_bytes()
    from ffcv.reader import Reader

    from viewpipe.formats import BETON

    assert (Reader(str(dst / BETON)).metadata["f1"] == UNLABELLED).all()  # FFCV's label field holds -1 too


def tiny_run(data: Path, out: Path, *extra: str):  # noqa: ANN201  (TrainConfig)
    from conftest import tiny_run_args
    from viewpipe.trainers.config import load_config

    return load_config(None, tiny_run_args(data, out, "epochs=1", "data.batch_size=8", "max_steps=2", *extra))


def test_pretraining_on_a_flat_folder_then_export(tmp_path: Path, flat: Path) -> None:
    from viewpipe.trainers.engine import pretrain
    from viewpipe.trainers.export import export
    from viewpipe.trainers.models import _tiny, build_backbone

    result = pretrain(tiny_run(flat, tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == result["step"] == 2 and np.isfinite(result["last"]["loss"])
    # the run exports: resnet_tiny in torchvision's ResNet names, the stem as conv1/bn1
    info = export(tmp_path / "run", tmp_path / "tiny.pth", "torchvision")
    assert info.backbone == "resnet_tiny" and "conv1 = nn.Conv2d(3, C, 3, 1, 1" in info.how_to_load()
    sd = torch.load(tmp_path / "tiny.pth", weights_only=True)
    backbone = build_backbone("resnet_tiny")
    backbone.load_state_dict(ckpt["backbone"])
    net = _tiny()  # torchvision's ResNet class at the tiny widths, given the CIFAR stem as the export says
    net.conv1, net.maxpool = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False), torch.nn.Identity()
    net.fc = torch.nn.Linear(128, 1000)
    net.load_state_dict(sd, strict=True)
    assert torch.equal(net.conv1.weight, backbone.stem[0].weight)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone.eval().pooled(x), rtol=1e-5, atol=1e-5)


def test_knn_and_linear_refuse_an_unlabelled_set(flat: Path, image_folder: Path) -> None:
    from viewpipe.trainers.clean import CleanOptions
    from viewpipe.trainers.eval import LinearConfig, knn_accuracy, linear_probe
    from viewpipe.trainers.models import build_backbone

    backbone = build_backbone("resnet_tiny")
    opts = CleanOptions(16, workers=0, progress=False)
    for train, test, role in ((flat, image_folder, "train"), (image_folder, flat, "test")):
        with pytest.raises(ViewpipeError) as err:
            knn_accuracy(backbone, train, test, opts)
        message = str(err.value)
        assert len(message.splitlines()) == 1 and f"the {role} set {flat} has no labels" in message, message
        assert "evaluation needs a labelled set" in message
        with pytest.raises(ViewpipeError, match=f"linear probe: the {role} set .* has no labels"):
            linear_probe(backbone, train, test, LinearConfig(epochs=1, size=16, workers=0, progress=False), "cpu")


def test_cli_eval_on_an_unlabelled_set_is_one_line(tmp_path: Path, flat: Path, image_folder: Path) -> None:
    from viewpipe.augment import IMAGENET_MEAN, IMAGENET_STD
    from viewpipe.trainers.models import build_backbone

    ckpt = tmp_path / "last.pt"
    torch.save({"backbone_name": "resnet_tiny", "backbone": build_backbone("resnet_tiny").state_dict(),
                "image_size": 16, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}, ckpt)
    code = "import sys; from viewpipe.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "eval", "linear", "--checkpoint", str(ckpt), "--train", str(flat),
                          "--test", str(image_folder), "--workers", "0", "--device", "cpu", "--no-progress"],
                         capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: linear probe: the train set "), res.stderr
    assert "has no labels" in lines[0] and "Traceback" not in res.stderr


def test_a_knn_monitor_on_unlabelled_or_training_data_is_refused_before_training(tmp_path: Path, flat: Path,
                                                                                image_folder: Path) -> None:
    """The pretraining engine checks its kNN monitor's sets when it starts, not at the first kNN epoch: an
    unlabelled test set, or the training set itself as the test set, is one line before any step."""
    from viewpipe.trainers.engine import Trainer

    with pytest.raises(ViewpipeError, match="labelled") as unlabelled:
        Trainer(tiny_run(image_folder, tmp_path / "a", f"data.test_path={flat}", "knn_every=1"))
    assert "\n" not in str(unlabelled.value) and not (tmp_path / "a" / "log.jsonl").exists()
    with pytest.raises(ViewpipeError, match="the same") as same:
        Trainer(tiny_run(image_folder, tmp_path / "b", f"data.test_path={image_folder}", "data.test_split=train",
                         "knn_every=1"))
    assert "\n" not in str(same.value)
    Trainer(tiny_run(flat, tmp_path / "c", f"data.test_path={flat}", "knn_every=0")).close()  # monitor off: no check


@pytest.mark.parametrize("backend", ["memory", "dali"])
def test_the_other_backends_deliver_unlabelled_batches(tmp_path: Path, flat: Path, backend: str) -> None:
    """An unlabelled folder through the memory backend (decoded from the folder) and the DALI backend (from its
    conversion): batches of views whose labels are all -1, and two steps of pretraining on them."""
    from viewpipe.convert import convert
    from viewpipe.trainers.engine import Trainer

    data = flat
    if backend == "dali":
        data = tmp_path / "converted"
        convert(flat, data, formats=("dali",), workers=1)
    t = Trainer(tiny_run(data, tmp_path / "run", f"data.backend={backend}"))
    try:
        loader = t.loader(0)
        loader.set_epoch(0)
        batch = next(iter(loader))
        assert len(batch.views) == 2 and batch.views[0].shape[1:] == (3, 24, 24)
        assert (batch.labels == UNLABELLED).all()
        result = t.fit()
        assert result["step"] == 2 and np.isfinite(result["last"]["loss"])
    finally:
        t.close()
