"""The overlap every backend shares (`EpochPosition.hand_out`): batch b + 1 is made while the consumer holds
batch b (on a side CUDA stream on a GPU; here, on the CPU, the same look-ahead without streams). It must
yield exactly the batches the synchronous loader yields, and keep the loader's position where the consumer
is: a checkpoint taken after batch k resumes at batch k + 1, not at the batch made ahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build
from viewpipe.augment import preset
from viewpipe.pipelines import LoaderConfig, get_backend
from viewpipe.state import SampleState
from viewpipe.convert import convert

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKENDS = ["torch", "dali", "ffcv"]
# each backend with its defaults, and DALI planning in a thread (`DaliOptions.plan_ahead`)
CASES = [pytest.param(b, {}, id=b) for b in BACKENDS] + [pytest.param("dali", {"plan_ahead": 2}, id="dali-plan_ahead2")]


@pytest.fixture(scope="module")
def dataset(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("overlap") / "ds"
    convert(image_folder, dst, formats=("dali", "ffcv"), workers=1, shard_size=32)
    return dst


def make(backend: str, data: Path, state: SampleState, overlap: bool, **kw):  # noqa: ANN201
    cfg = LoaderConfig(views=2, batch_size=16, augment=preset("mocov2", size=24), workers=1, seed=5)
    return build(get_backend(backend), data, cfg, state, overlap=overlap, **kw)


def same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        (va, la, ia, _, wa), (vb, lb, ib, _, wb) = x, y
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(wa, wb)
        assert len(va) == len(vb) and all(torch.equal(p, q) for p, q in zip(va, vb))


@pytest.mark.parametrize("backend,kw", CASES)
def test_overlapped_batches_equal_the_synchronous_ones(backend: str, kw: dict, dataset: Path, state_name: str) -> None:
    with SampleState.create(96, name=state_name) as st:
        st.set_boxes(np.tile(np.array([0.1, 0.2, 0.7, 0.9], np.float32), (96, 1)))
        sync, ahead = make(backend, dataset, st, False, **kw), make(backend, dataset, st, True, **kw)
        assert not sync.overlap and ahead.overlap and ahead.prefetch == sync.prefetch + 1
        for epoch in range(2):  # two epochs: the position moves to the next epoch after the last batch
            expected = list(sync)
            got = list(ahead)
            same(expected, got)
            assert sync.state_dict()["epoch"] == ahead.state_dict()["epoch"] == epoch + 1
            assert ahead.state_dict()["batch"] == 0
        for loader in (sync, ahead):
            getattr(loader, "close", lambda: None)()


@pytest.mark.parametrize("backend,kw", CASES)
def test_position_is_the_consumers_not_the_look_ahead(backend: str, kw: dict, dataset: Path, state_name: str) -> None:
    """Stopped after k batches, the overlapped loader (which has already made batch k) reports batch k as the
    next one, and a loader resumed from that state yields the same remaining batches as an uninterrupted one."""
    with SampleState.create(96, name=state_name) as st:
        full = list(make(backend, dataset, st, False))
        loader = make(backend, dataset, st, True, **kw)
        k = 2
        it = iter(loader)
        head = [next(it) for _ in range(k)]
        assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batch"] == k
        resumed = make(backend, dataset, st, True, **kw)
        resumed.load_state_dict(loader.state_dict())
        same(full, head + list(resumed))
        assert resumed.state_dict()["epoch"] == 1
        for x in (loader, resumed):
            getattr(x, "close", lambda: None)()
