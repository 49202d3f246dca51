"""What every backend shares: the epoch order (a pure function of seed and epoch) and the per-rank batches."""

from __future__ import annotations

import numpy as np
import pytest

from viewpipe.errors import ViewpipeError
from viewpipe.dist import rank_world as dist_rank_world
from viewpipe.pipelines import LoaderConfig, epoch_batches, epoch_order


def test_epoch_order_partitions_the_samples_over_ranks() -> None:
    for n in (96, 95):
        for W in (2, 3):
            orders = [epoch_order(n, 5, 2, True, r, W, drop_last=False) for r in range(W)]
            assert sorted(np.concatenate(orders).tolist()) == list(range(n))
            dropped = [epoch_order(n, 5, 2, True, r, W, drop_last=True) for r in range(W)]
            assert {len(o) for o in dropped} == {n // W}
            assert len(set(np.concatenate(dropped).tolist())) == W * (n // W)
    assert np.array_equal(epoch_order(50, 1, 3), epoch_order(50, 1, 3))
    assert not np.array_equal(epoch_order(50, 1, 3), epoch_order(50, 1, 4))
    assert not np.array_equal(epoch_order(50, 1, 3), epoch_order(50, 2, 3))
    assert epoch_order(7, 0, 0, shuffle=False).tolist() == list(range(7))


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_gets_the_same_number_of_batches(drop_last: bool) -> None:
    """Without drop_last every sample once and equal batch counts (a DDP step never waits for a finished
    rank); with it only full batches. Checked over all small (n, world, batch) combinations."""
    impossible = 0
    for n in range(1, 50):
        for W in (1, 2, 3, 4, 7):
            for B in (1, 2, 3, 5, 8):
                cfg = LoaderConfig(batch_size=B, drop_last=drop_last, seed=n)
                try:
                    per_rank = [epoch_batches(n, cfg, 1, r, W) for r in range(W)]
                except ViewpipeError as exc:
                    assert not drop_last and "equal batch counts" in str(exc)
                    assert B == 1 or n < W
                    impossible += 1
                    continue
                assert len({len(b) for b in per_rank}) == 1, (n, W, B)
                flat = [i for batches in per_rank for b in batches for i in b.tolist()]
                assert len(flat) == len(set(flat))
                if drop_last:
                    assert all(len(b) == B for batches in per_rank for b in batches)
                    assert len(flat) == (n // W) // B * B * W
                else:
                    assert sorted(flat) == list(range(n))
                    assert all(1 <= len(b) <= B for batches in per_rank for b in batches)
                    # only the last batch (or the last two, after a split) are short
                    assert all(len(b) == B for batches in per_rank for b in batches[:-2])
    assert impossible > 0 if not drop_last else impossible == 0


def test_rank_and_world_from_arguments() -> None:
    assert dist_rank_world() == (0, 1)
    assert dist_rank_world(2, 4) == (2, 4)
    with pytest.raises(ViewpipeError, match="outside world size"):
        dist_rank_world(4, 4)
