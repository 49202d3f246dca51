"""Where a loader is in its epochs and how it hands batches out: `EpochPosition` (set_epoch, mid-epoch
resume, the one-batch look-ahead that overlaps a batch's device work with the consumer's step)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from viewpipe.pipelines.config import LoaderConfig
from viewpipe.pipelines.plan import Substitutes, epoch_batches, epoch_order


def batch_tensors(batch: Any) -> Iterator[Any]:
    """Every tensor of a batch (tuples and lists nested), for stream bookkeeping."""
    if isinstance(batch, (tuple, list)):
        for item in batch:
            yield from batch_tensors(item)
    elif hasattr(batch, "record_stream"):
        yield batch


class EpochPosition:
    """Where a loader is in its epochs, and how it hands batches out (the part of `Loader` that knows no
    data): `set_epoch`, `state_dict` / `load_state_dict` (epoch and next batch: mid-epoch resume), `order`,
    `batches`, `len`, and `hand_out`. Iteration starts at batch `_next` of `epoch`.

    Overlap: a backend describes each batch as a function doing the batch's device work (copy, crops,
    augmentation) and `hand_out` runs batch b + 1's function while the consumer holds batch b. On CUDA it
    runs on a side stream, so that the augmentation overlaps the training step on the consumer's stream (the
    consumer's stream waits for the batch's event, and its tensors are recorded on the consumer's stream so
    that their memory is not reused early); on the CPU the same one-batch look-ahead runs without streams
    (the tests' twin of the CUDA path). It adds one batch to how late a SampleState update can arrive."""

    def __init__(self, num_samples: int, cfg: LoaderConfig, rank: int, world: int, device: Any, overlap: bool,
                 substitutes: Substitutes) -> None:
        self.num_samples, self.cfg, self.rank, self.world = num_samples, cfg, rank, world
        self.device, self.overlap, self.substitutes = device, overlap, substitutes
        self.epoch = 0
        self._next = 0  # the batch of `epoch` the next iteration starts at (set by load_state_dict)
        self._generation = 0  # the current iteration: an older one stops handing out batches

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its first batch on the next iteration (the order depends on (seed, epoch))."""
        self.epoch, self._next = int(epoch), 0

    def state_dict(self) -> dict:
        """Where the loader is: the epoch and the next batch (a finished epoch is the next one at batch 0), and
        the samples replaced so far (`decode_failures`)."""
        return {"epoch": self.epoch, "batch": self._next, "decode_failures": self.substitutes.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict()`: the next iteration yields the remaining batches of that epoch."""
        self.epoch, self._next = int(sd["epoch"]), int(sd["batch"])
        self.substitutes.load_state_dict(sd.get("decode_failures", {}))

    @property
    def decode_failures(self) -> dict[int, str]:
        """The samples replaced so far because they cannot be used (index → why)."""
        return self.substitutes.state_dict()

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's sample order in `epoch` (default: the current one)."""
        return epoch_order(self.num_samples, self.cfg.seed, self.epoch if epoch is None else epoch,
                           self.cfg.shuffle, self.rank, self.world, self.cfg.drop_last)

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of sample indices in `epoch` (see `epoch_batches`)."""
        return epoch_batches(self.num_samples, self.cfg, self.epoch if epoch is None else epoch, self.rank,
                             self.world)

    def __len__(self) -> int:
        return len(self.batches())

    def hand_out(self, epoch: int, count: int, pending: Iterable[tuple[int, Callable[[], Any]]]) -> Iterator[Any]:
        """Yield the batches of `pending` — (batch number, function making the batch) pairs of `epoch`, which
        has `count` batches — keeping the position: after batch b is handed out the next iteration starts at
        b + 1, after the last one at the next epoch. With `overlap`, one batch ahead (see the class)."""
        import torch

        self._generation += 1
        generation = self._generation
        cuda = self.overlap and torch.device(self.device).type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        ready, items = None, iter(pending)
        while self._generation == generation:  # (a newer iteration takes over the backend: this one stops)
            try:
                b, work = next(items)
            except StopIteration:
                break
            with torch.cuda.stream(side) if side is not None else nullcontext():
                batch = work()
            made = (b, batch, side.record_event() if side is not None else None)
            if not self.overlap:
                ready, made = made, None
            if ready is not None:
                if self._generation != generation:
                    return
                yield self._hand_over(epoch, count, *ready)
            ready = made
        if ready is not None and self._generation == generation:
            yield self._hand_over(epoch, count, *ready)
        if self._generation == generation and self.epoch == epoch and self._next >= count:
            self.epoch, self._next = epoch + 1, 0  # (an epoch resumed at its end has nothing left)

    def _hand_over(self, epoch: int, count: int, b: int, batch: Any, event: Any) -> Any:
        if event is not None:
            import torch

            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in batch_tensors(batch):
                if t.is_cuda:
                    t.record_stream(stream)
        self.epoch, self._next = (epoch + 1, 0) if b + 1 >= count else (epoch, b + 1)
        return batch


def resolve_overlap(overlap: bool | None, device: Any) -> bool:
    """`overlap=None` (auto): on for CUDA devices, where it hides the augmentation behind the training step."""
    import torch

    return torch.device(device).type == "cuda" if overlap is None else bool(overlap)
