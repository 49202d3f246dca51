"""State updaters: work over the whole training set whose result the running loaders must read.

One protocol and one code path. A method declares the updaters it needs (`Method.updaters(cfg)`); at each
epoch boundary the engine runs those that are `due`, each through `StateUpdater.run`:

    result = compute(method, data, epoch)   every rank its strided share of the dataset's clean images,
                                            gathered back into dataset order: the same result on every rank
    publish(state, result, epoch)           local rank 0 of each node, into its node's SampleState
    barrier()                               no rank trains on before every node's state holds the result
    → log fields                            `<name>_seconds` and the updater's own (`report`)

The loaders read the SampleState live, so the next batches they plan use the new result without a restart.
Two implementations: ContrastiveCrop's boxes (`trainers/ccrop.py`, after an epoch) and CsMl's neighbour table
(`trainers/csml.py`, before one).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viewpipe.dist import barrier
from viewpipe.sources import Source
from viewpipe.state import SampleState
from viewpipe.trainers.clean import CleanOptions

if TYPE_CHECKING:
    from viewpipe.trainers.base import Method


@dataclass
class DataContext:
    """What an updater's pass needs: the training data, the live sample state the loaders read, how to read
    the whole dataset (`clean`: built once from the config), whether this process writes its node's state
    (`writer`: local rank 0) and is the main rank (`main`: writes files such as the box grid), and the run
    folder."""

    source: Source
    state: SampleState
    clean: CleanOptions
    writer: bool = True
    main: bool = True
    out: Path = Path(".")


class StateUpdater(ABC):
    """A pass over the whole dataset published to the SampleState. A subclass sets `name` (its log fields'
    prefix) and `before_epoch` (True: runs before epoch e's first batch, but not when a run resumes inside the
    epoch; False: after its last batch, before the epoch's checkpoint) and implements `due`, `compute` and
    `publish`, optionally `report`. `updates` counts the runs."""

    name: str = "update"
    before_epoch: bool = False

    def __init__(self) -> None:
        self.updates = 0

    @abstractmethod
    def due(self, epoch: int) -> bool:
        """Whether it runs at `epoch` (before or after it, as `before_epoch` says)."""

    @abstractmethod
    def compute(self, method: Method, data: DataContext, epoch: int) -> Any:
        """The pass over the whole dataset (every rank calls it and gets the whole result)."""

    @abstractmethod
    def publish(self, state: SampleState, result: Any, epoch: int) -> None:
        """Write `result` into the sample state (called on each node's writer only)."""

    def report(self, result: Any, data: DataContext, epoch: int) -> dict[str, Any]:
        """Log fields of this run beyond its duration."""
        return {}

    def run(self, method: Method, data: DataContext, epoch: int) -> dict[str, Any]:
        """Compute, publish (writers), wait for every rank; returns the log fields. Every rank calls it."""
        t0 = time.perf_counter()
        result = self.compute(method, data, epoch)
        if data.writer:
            self.publish(data.state, result, epoch)
        barrier()  # every node's state holds the result before any rank's loader reads it
        self.updates += 1
        return {f"{self.name}_seconds": time.perf_counter() - t0, **self.report(result, data, epoch)}
