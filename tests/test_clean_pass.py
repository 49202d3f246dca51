"""The passes over the whole dataset through each backend's reader (`viewpipe.trainers.clean`): every backend
that runs on the CPU (the memory backend, DALI's CPU mode, FFCV's CPU decoder) gives the PIL pass's clean
images within the stated tolerance, and the same boxes, neighbours and kNN predictions from the same weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build, loader_cfg

from viewpipe.boxes import boxes_from_features
from viewpipe.pipelines import get_backend
from viewpipe.pipelines.plan import clean_windows
from viewpipe.sources import FolderSource, open_source
from viewpipe.torch_ops import resized_centre
from viewpipe.trainers.ccrop import box_iou
from viewpipe.trainers.clean import CleanOptions, clean_loader, dataset_outputs
from viewpipe.trainers.csml import cosine_knn
from viewpipe.trainers.eval import knn_predict

SIZE = 32
# (max, mean) |clean image − PIL's| per pixel and channel in uint8 levels allowed, per backend, for both the
# size×size resize and resize + centre crop. The memory backend resizes with torch's port of PIL's filter
# (rounding apart); DALI's antialiased resize differs from PIL's filter at a few pixels; FFCV's decoder runs
# libjpeg-turbo with TJFLAG_FASTDCT, a less exact inverse DCT.
TOLERANCE = {"memory": (1, 0.1), "dali": (16, 0.5), "ffcv": (64, 3.5)}


@pytest.fixture(scope="module")
def source(converted):  # noqa: ANN001, ANN201
    return open_source(converted)


@pytest.fixture(scope="module")
def net():  # noqa: ANN201
    from viewpipe.trainers.models import build_backbone

    torch.manual_seed(0)
    return build_backbone("resnet_tiny").eval()


def options(backend: str, resize: int = 0) -> CleanOptions:
    return CleanOptions(SIZE, resize=resize, batch_size=16, workers=1, progress=False, backend=backend)


def levels(source, backend: str, resize: int = 0) -> torch.Tensor:  # noqa: ANN001
    """The clean images of a pass, back in uint8 levels."""
    o = options(backend, resize)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (o.mean, o.std))
    return dataset_outputs(lambda x: ((x * std + mean) * 255).round(), source, o)


def outputs(source, net, backend: str) -> tuple[np.ndarray, torch.Tensor]:  # noqa: ANN001
    """The boxes (threshold 0.1) and L2-normalised pooled features of a pass."""
    o = options(backend)
    boxes = dataset_outputs(lambda x: boxes_from_features(net(x), (SIZE, SIZE), 0.1), source, o).numpy()
    return boxes, dataset_outputs(lambda x: F.normalize(net.pooled(x), dim=1), source, o)


@pytest.fixture(scope="module")
def pil(source, net):  # noqa: ANN001, ANN201
    return {"levels": levels(source, "torch"), "levels48": levels(source, "torch", 48), "out": outputs(source, net, "torch")}


@pytest.mark.parametrize("backend", sorted(TOLERANCE))
def test_clean_images_equal_pil_within_the_tolerance(source, pil, backend: str) -> None:  # noqa: ANN001
    most, mean = TOLERANCE[backend]
    for resize, ref in ((0, pil["levels"]), (48, pil["levels48"])):
        diff = (levels(source, backend, resize) - ref).abs()
        assert diff.shape == ref.shape
        assert diff.max() <= most and diff.mean() <= mean, (backend, resize, float(diff.max()), float(diff.mean()))


@pytest.mark.parametrize("backend", sorted(TOLERANCE))
def test_boxes_neighbours_and_knn_agree_with_the_pil_pass(source, net, pil, backend: str) -> None:  # noqa: ANN001
    boxes, feats = outputs(source, net, backend)
    ref_boxes, ref_feats = pil["out"]
    iou = box_iou(boxes, ref_boxes)
    assert iou.mean() >= 0.97 and (iou >= 0.9).mean() >= 0.9, (iou.mean(), (iou >= 0.9).mean())
    k, everyone = 5, torch.arange(len(source))
    mine, theirs = cosine_knn(feats, k, everyone), cosine_knn(ref_feats, k, everyone)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(mine, theirs)])
    assert overlap >= 0.9, overlap
    labels = torch.as_tensor(np.asarray(source.labels))
    def top1(f: torch.Tensor) -> float:  # the even samples as the bank, the odd ones as queries
        pred = knn_predict(f[1::2], f[0::2], labels[0::2], int(labels.max()) + 1, k=10)
        return float((pred == labels[1::2]).float().mean()) * 100
    assert abs(top1(feats) - top1(ref_feats)) <= 7.0  # at most 3 of the 48 queries change


def test_clean_windows_are_the_whole_image_and_the_centre_crop_follows_torchvision() -> None:
    from torchvision.transforms import functional as TF

    sizes = np.array([[375, 500], [500, 375], [333, 500], [48, 48], [41, 97]])
    win = clean_windows(sizes, 2)
    assert win.shape == (5, 2, 4) and (win[:, :, :2] == 0).all() and (win[:, 1, 2:] == sizes).all()
    for (h, w), (rh, rw, top, left) in zip(sizes.tolist(), resized_centre(sizes, 32, 48).tolist()):
        img = torch.zeros(3, h, w)
        assert list(TF.resize(img, 48, antialias=True).shape[1:]) == [rh, rw]
        marked = torch.zeros(1, rh, rw)
        marked[0, top, left] = 1
        assert TF.center_crop(marked, [32, 32])[0, 0, 0] == 1  # torchvision's crop starts where ours does


def test_a_pass_reads_through_the_backend_asked_for(converted, image_folder) -> None:  # noqa: ANN001
    """FFCV reads a converted dataset; a folder it cannot read goes to the reference backend (PIL)."""
    with clean_loader(open_source(converted), options("ffcv")) as loader:
        assert type(loader) is get_backend("ffcv")
    with clean_loader(FolderSource(image_folder), options("ffcv")) as loader:
        assert type(loader) is get_backend("torch")


def test_the_memory_backend_pass_reuses_the_training_loaders_device_copy(source) -> None:  # noqa: ANN001
    with build(get_backend("memory"), source, loader_cfg(workers=1)) as train:
        with clean_loader(source, options("memory")) as clean:
            assert clean.images is train.images  # one decode, one copy on the device


def test_amp_gives_bf16_views_under_autocast(source) -> None:  # noqa: ANN001
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return x.float().mean(dim=(1, 2, 3))

    out = dataset_outputs(fn, source, replace(options("memory"), amp=True, channels_last=True))
    assert len(out) == len(source) and set(seen) == {(torch.bfloat16, True)}
