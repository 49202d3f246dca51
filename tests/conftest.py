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


def check_resumed(expected: list, rest: list) -> None:
    """A resumed loader's batches `(views, labels, indices, windows)` equal the uninterrupted ones exactly."""
    import torch

    assert len(rest) == len(expected)
    for (va, la, ia, _, wa), (vb, lb, ib, _, wb) in zip(expected, rest):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(wa, wb)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))


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
