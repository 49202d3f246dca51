"""Shared fixtures: small generated data (tests never need ../shared) and subprocess helpers."""

from __future__ import annotations

import os

# The fused Triton kernels run on CPU tensors through Triton's interpreter: the tests are their CPU twin (CI has
# no GPU). Set before anything imports torch, which imports triton: Triton decides at decoration time whether a
# kernel (its own language functions included) is compiled or interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, **kw
    )


def start_python(code: str, **kw) -> subprocess.Popen:
    """Start Python code in a fresh interpreter, stdout as a line-buffered pipe."""
    return subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )


@pytest.fixture
def state_name() -> str:
    """A unique sample-state name for one test."""
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated ImageNet-style folder (varied sizes, 12 classes, true boxes in boxes.npy)."""
    from viewpipe.synthetic import make_folder

    return make_folder(tmp_path_factory.mktemp("images"), n=96, size_range=(40, 96), seed=1)


@pytest.fixture(scope="session")
def converted(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`image_folder` converted once for every loader test: DALI's shards (32 samples each) and FFCV's .beton
    in one folder (the reference backend reads the shards). Tests that damage it work on a copy."""
    from viewpipe.convert import convert

    dst = tmp_path_factory.mktemp("converted") / "ds"
    convert(image_folder, dst, formats=("dali", "ffcv"), workers=1, shard_size=32)
    return dst


def loader_cfg(**kw):  # noqa: ANN003, ANN201  (viewpipe.pipelines.LoaderConfig)
    """The loader tests' configuration: 2 mocov2 views of 32 px, batches of 8, 2 workers, seed 3, unless given."""
    from viewpipe.augment import preset
    from viewpipe.pipelines import LoaderConfig

    return LoaderConfig(**(dict(views=2, batch_size=8, augment=preset("mocov2", size=32), workers=2, seed=3) | kw))


def with_options(cfg, **options):  # noqa: ANN001, ANN003, ANN201  (viewpipe.pipelines.LoaderConfig)
    """`cfg` with each option set where `LoaderConfig` keeps it: its own fields (device, companions, overlap,
    split, ...) or a backend's settings (`cfg.dali.prefetch_queue_depth`, `cfg.ffcv.fused`, ...)."""
    from dataclasses import fields, replace

    for key, value in options.items():
        if key in {f.name for f in fields(cfg)}:
            cfg = replace(cfg, **{key: value})
            continue
        section = next((f.name for f in fields(cfg) if hasattr(getattr(cfg, f.name), "__dataclass_fields__")
                        and key in getattr(cfg, f.name).__dataclass_fields__), None)
        if section is None:
            raise TypeError(f"LoaderConfig has no option {key!r}")
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})
    return cfg


def build(cls, data, cfg=None, state=None, *, rank=None, world=None, **options):  # noqa: ANN001, ANN003, ANN201
    """`cls(data, cfg with options, state, rank=, world=)`: a loader class built as every loader is."""
    from viewpipe.pipelines import LoaderConfig

    return cls(data, with_options(cfg if cfg is not None else LoaderConfig(), **options), state, rank=rank, world=world)


def documented_windows(sizes: "np.ndarray", boxes: "np.ndarray", cfg,  # noqa: ANN001  (a LoaderConfig)
                       rng: "np.random.Generator") -> "np.ndarray":
    """(B, V, 4) windows from the loaders' documented draws: one `draw` of V·B on `rng` (view-major; a batch's
    generator is `default_rng([seed, epoch, rank, batch])`) through the NumPy sampler, for images of `sizes`
    (B, 2) and their `boxes` (B, 4)."""
    from viewpipe.crop import draw, windows_from_draws

    V, B = cfg.views, len(sizes)
    win = windows_from_draws(np.tile(sizes, (V, 1)), np.tile(boxes, (V, 1)), draw(rng, V * B, cfg.crop), cfg.crop)
    return win.reshape(V, B, 4).transpose(1, 0, 2)


def core_crop(img, window, size: int = 32):  # noqa: ANN001, ANN201  (torch.Tensor)
    """The core's crop-resize (`viewpipe.augment.crop_resize`) of `window` (top, left, h, w) of one (H, W, 3)
    uint8 image tensor: (size, size, 3) float grey levels."""
    import torch

    from viewpipe.augment import crop_resize

    x = img.permute(2, 0, 1)[None].float()
    win = torch.as_tensor(np.asarray(window), dtype=torch.int32).reshape(1, 1, 4)
    return crop_resize(x, win, size)[0].permute(1, 2, 0)


def plain_augment(size: int = 32):  # noqa: ANN201  (viewpipe.augment.AugmentConfig)
    """Photometric augmentation off and no normalisation: a view is its resized crop / 255."""
    from viewpipe.augment import AugmentConfig, ViewAugment

    return AugmentConfig(size=size, views=(ViewAugment(flip=0, jitter_p=0, grayscale=0, blur=0),),
                         mean=(0, 0, 0), std=(1, 1, 1))


def random_boxes(n: int, seed: int = 0) -> "np.ndarray":
    """n boxes (h0, w0, h1, w1) of half the image's sides, placed at random."""
    lo = np.random.default_rng(seed).uniform(0, 0.4, (n, 2))
    return np.concatenate([lo, lo + 0.5], 1).astype(np.float32)


class FfcvDecoded:
    """The JPEGs stored in a .beton, decoded outside the loader: by libffcv's `imdecode` called directly
    (FFCV's decode, into a tight buffer) and by PIL; (H, W, 3) uint8 tensors."""

    def __init__(self, root: Path) -> None:
        from ffcv.reader import Reader

        from viewpipe.formats import BETON

        reader = Reader(str(root / BETON))
        self.meta = reader.metadata["f0"]
        self.size = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        self.file = np.memmap(root / BETON, dtype=np.uint8, mode="r")

    def data(self, k: int) -> tuple["np.ndarray", int, int]:
        ptr = int(self.meta["data_ptr"][k])
        return np.array(self.file[ptr : ptr + self.size[ptr]]), int(self.meta["height"][k]), int(self.meta["width"][k])

    def __call__(self, k: int):  # noqa: ANN204  (torch.Tensor)
        import torch
        from ffcv.libffcv import imdecode

        data, H, W = self.data(k)
        out = np.zeros((H, W, 3), np.uint8)
        assert imdecode(data, out, H, W, H, W, 0, 0, 1, 1, False, False) == 0
        return torch.from_numpy(out)

    def pil(self, k: int):  # noqa: ANN201  (torch.Tensor)
        import io

        import torch
        from PIL import Image

        data, H, W = self.data(k)
        img = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
        assert img.shape == (H, W, 3)
        return torch.from_numpy(img.copy())


@pytest.fixture(scope="module")
def one_torch_thread():
    """On small CPU machines torch's OpenMP threads and the loaders' own threads (DALI's workers, FFCV's
    decoders) oversubscribe the cores and the CPU photometric ops slow down about 20x (measured on 2 cores):
    modules that use a loader in-process take one torch thread (`pytestmark = usefixtures(...)`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_batches(batches: list, labels: "np.ndarray", views: int, size: int) -> list[int]:
    """Every batch `(views, labels, indices)` well formed (V float views (B, 3, S, S), finite, int64 labels
    equal to the dataset's, int64 indices); returns the indices seen, in order."""
    import torch

    seen: list[int] = []
    for vs, lab, indices, *_ in batches:
        B = len(indices)
        assert len(vs) == views
        for v in vs:
            assert v.shape == (B, 3, size, size) and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert lab.dtype == torch.int64 and indices.dtype == torch.int64
        assert torch.equal(lab, torch.from_numpy(labels[indices.numpy()]))
        seen += indices.tolist()
    return seen


def same_batches(a: list, b: list) -> None:
    """Equal lists of batches, every field (views, labels, indices, neighbours, windows) exactly."""
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) == 5
        assert len(x[0]) == len(y[0]) and all(torch.equal(u, v) for u, v in zip(x[0], y[0]))
        assert all(u is v is None or torch.equal(u, v) for u, v in zip(x[1:], y[1:]))


def check_resumed(expected: list, rest: list) -> None:
    """A resumed loader's batches equal the uninterrupted ones exactly (`same_batches`)."""
    same_batches(expected, rest)


def step_losses(out: Path) -> dict[int, float]:
    """Step → loss of a training run's JSONL log (`out/log.jsonl`), step lines only (not the epoch events)."""
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in r and "event" not in r}


def view_params(n: int, **kw):  # noqa: ANN003, ANN201  (viewpipe.augment.ViewParams)
    """Hand-made ViewParams for n samples: every op off and the identity factors, unless given."""
    import torch

    from viewpipe.augment import ViewParams

    base = dict(
        flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.zeros(n, dtype=torch.bool),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        order=torch.arange(4).repeat(n, 1),
        gray=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool),
        sigma=torch.ones(n),
        solarize=torch.zeros(n, dtype=torch.bool),
    )
    base.update(kw)
    return ViewParams(**base)


def tiny_run_args(data: Path, out: Path, *extra: str, backend: str = "torch", workers: int = 0) -> list[str]:
    """The overrides of a tiny CPU run: resnet_tiny on 24 px views, batches of 16 (96 images: 6 steps an epoch),
    2 epochs, no boxes, no kNN, a log line every step; `extra` overrides come last."""
    return [f"data.path={data}", f"data.backend={backend}", "backbone=resnet_tiny", "epochs=2", "data.batch_size=16",
            f"data.workers={workers}", "data.size=24", "method_args={queue: 64}", "ccrop.enabled=false", f"out={out}",
            "log_every=1", "optim.lr=0.05", "device=cpu", "channels_last=false", "knn_every=0", *extra]


def fit(trainer) -> dict:  # noqa: ANN001  (viewpipe.trainers.engine.Trainer)
    """`trainer.fit()`, the trainer closed after it whatever happens (its shared memory, loaders, log)."""
    try:
        return trainer.fit()
    finally:
        trainer.close()
