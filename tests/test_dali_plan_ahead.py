"""The DALI backend's `plan_ahead` (`DaliOptions.plan_ahead` = N ≥ 1): the external source's outputs (plans,
encoded bytes, windows and ROIs) made by a thread up to N batches before DALI asks. It must yield exactly the
batches of the in-callback path (0, the default) — across epochs, a mid-epoch resume, a sample that fails to
decode (the batches planned ahead with the old substitutes planned again), companions and multi-crop — keep
the live-state bound `prefetch` (DALI's queue depth + N, plus one with overlap), raise the thread's errors in
the consumer, and leave no thread behind."""

from __future__ import annotations

import gc
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build, loader_cfg, plain_augment, random_boxes, same_batches
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError
from viewpipe.formats import INDEX, DatasetIndex, shard_paths
from viewpipe.pipelines import DaliOptions, ViewGroup, epoch_order
from viewpipe.pipelines.dali import DaliLoader
from viewpipe.state import SampleState

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N = 96
THREAD = "viewpipe-dali-plan-ahead"


def planning_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


@pytest.fixture(scope="module")
def undecodable(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A copy of the dataset whose sample in batch 4 of epoch 0 (seed 3, batches of 8) has its header
    overwritten, and no checksums in its index: only DALI's decoder finds it (as in tests/test_dali.py)."""
    index = DatasetIndex.load(converted)
    dst = tmp_path_factory.mktemp("plan_ahead") / "ds"
    shutil.copytree(converted, dst)
    with np.load(dst / INDEX) as z:
        arrays = {k: z[k] for k in z.files if "checksum" not in k}
    np.savez(dst / INDEX, **arrays)
    bad = int(epoch_order(len(index), 3, 0)[4 * 8 + 3])
    tar, _ = shard_paths(dst, int(index.shards[bad]))
    with open(tar, "r+b") as f:
        f.seek(int(index.offsets[bad]))
        f.write(b"\0" * 64)
    return dst, bad


def two_epochs(data: Path, st: SampleState, ahead: int) -> tuple[list, dict]:
    """Epoch 0 whole, epoch 1 stopped after 3 batches (closed mid-epoch) and resumed by a new loader."""
    groups = (ViewGroup(2, 32, (0.2, 1.0)), ViewGroup(2, 16, (0.05, 0.2)))
    cfg = loader_cfg(groups=groups, crop=CropConfig(alpha=0.6))
    kw = dict(device="cpu", companions=True, overlap=True, plan_ahead=ahead)
    loader = build(DaliLoader, data, cfg, st, **kw)
    assert loader.prefetch == 2 + ahead + 1
    got = list(loader)
    it = iter(loader)
    got += [next(it) for _ in range(3)]
    sd = loader.state_dict()
    loader.close()
    assert not planning_threads() and sd["epoch"] == 1 and sd["batch"] == 3
    resumed = build(DaliLoader, data, cfg, st, **kw)
    resumed.load_state_dict(sd)
    got += list(resumed)
    resumed.close()
    return got, resumed.decode_failures


def test_the_same_batches_as_the_callback(undecodable: tuple[Path, int], state_name: str,
                                          capfd: pytest.CaptureFixture) -> None:
    """Views (exactly), labels, indices, neighbours and windows of plan_ahead 2 equal plan_ahead 0's over two
    epochs with companions, two view groups and overlap, a mid-epoch resume and a sample that fails to decode
    (replaced once, everywhere)."""
    data, bad = undecodable
    with SampleState.create(N, name=state_name, neighbours=3) as st:
        st.set_boxes(random_boxes(N))
        st.set_neighbours(np.stack([(np.arange(N) + 5 * (j + 1)) % N for j in range(3)], 1).astype(np.int32))
        old, old_failed = two_epochs(data, st, 0)
        assert capfd.readouterr().err.count("fails to decode") == 1
        new, new_failed = two_epochs(data, st, 2)
        assert capfd.readouterr().err.count("fails to decode") == 1
    assert len(old) == 2 * (N // 8) and list(old_failed) == list(new_failed) == [bad]
    same_batches(old, new)
    seen = {k for b in new for k in b.indices.tolist() + b.neighbours.tolist()}
    assert bad not in seen and (bad + 1) % N in seen


def test_a_state_update_arrives_within_prefetch(converted: Path, state_name: str) -> None:
    """Boxes published after the consumer received batch u are used from batch u + prefetch on (DALI's queue
    depth 2 + plan_ahead 2), and, once the thread has filled its queue, not before."""
    cfg = loader_cfg(augment=plain_augment(32), crop=CropConfig(alpha=0.6))
    new_box = np.array([0.0, 0.0, 0.25, 0.3], dtype=np.float32)
    runs = {}
    with SampleState.create(N, name=state_name) as st:
        for name, box in (("new", new_box), ("old", np.array([0.0, 0.0, 1.0, 1.0], np.float32))):
            st.set_boxes(np.tile(box, (N, 1)))
            runs[name] = [w for *_, w in build(DaliLoader, converted, cfg, st, device="cpu", overlap=False)]
        loader = build(DaliLoader, converted, cfg, st, device="cpu", overlap=False, plan_ahead=2)
        assert loader.prefetch == 4
        update_after, got = 3, []
        for b, (*_, windows) in enumerate(loader):
            got.append(next(k for k, w in runs.items() if np.array_equal(w[b].numpy(), windows.numpy())))
            if b == update_after:
                time.sleep(0.5)  # (the thread fills its queue)
                st.set_boxes(np.tile(new_box, (N, 1)))
        loader.close()
    assert got == ["old"] * (update_after + loader.prefetch) + ["new"] * (len(got) - update_after - loader.prefetch)


def test_errors_reach_the_consumer_and_no_thread_is_left(converted: Path) -> None:
    """An error met by the thread is raised in the consumer with its message; close() mid-epoch, a new
    iteration and a loader dropped without close() leave no planning thread; plan_ahead < 0 is an error."""
    loader = build(DaliLoader, converted, loader_cfg(), device="cpu", plan_ahead=2)
    it = iter(loader)
    next(it)
    assert len(planning_threads()) == 1
    iter(loader).__next__()  # a new iteration restarts the thread
    assert len(planning_threads()) == 1
    loader.close()
    assert not planning_threads()
    plan = loader.planner.plan

    def failing(epoch: int, b: int, indices: np.ndarray):  # noqa: ANN202
        if b == 5:
            raise ValueError("the plan of batch 5 cannot be made")
        return plan(epoch, b, indices)

    loader.planner.plan = failing
    with pytest.raises(ValueError, match="the plan of batch 5 cannot be made"):
        list(loader)
    loader.close()
    assert not planning_threads()
    dropped = build(DaliLoader, converted, loader_cfg(), device="cpu", plan_ahead=2)
    next(iter(dropped))
    del dropped
    for _ in range(40):
        gc.collect()
        if not planning_threads():
            break
        time.sleep(0.05)
    assert not planning_threads()
    with pytest.raises(ViewpipeError, match="plan_ahead"):
        DaliOptions(plan_ahead=-1)


def test_a_run_asks_for_it_with_data_dali_plan_ahead(converted: Path, tmp_path: Path) -> None:
    """`data.dali_plan_ahead` reaches the training loader's DaliOptions, and its planning thread runs."""
    from conftest import tiny_run_args
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    cfg = load_config(None, tiny_run_args(converted, tmp_path / "run", "data.dali_plan_ahead=2", backend="dali",
                                          workers=1))
    trainer = Trainer(cfg)
    try:
        loader = trainer.loader(0)
        assert loader.cfg.dali.plan_ahead == 2 and loader.prefetch == loader.cfg.dali.prefetch_queue_depth + 2
        assert len(next(iter(loader)).indices) == 16 and planning_threads()
    finally:
        trainer.close()
    assert not planning_threads()
