"""The DALI backend: each image decoded once (nvJPEG on the GPU with `device="mixed"`, libjpeg-turbo on the
CPU with `device_id=None`), its V ContrastiveCrop views cut and resized inside DALI, the photometric
augmentations in torch on the views' device.

Data flow per batch (one `fn.external_source` callback in the main process, called by DALI up to
`cfg.dali.prefetch_queue_depth` batches ahead of the consumer):

1. the batch's sample indices: a pure function of (seed, epoch, rank, world) — see `epoch_batches`;
2. their encoded bytes, sliced out of the memory-mapped WebDataset tars (`ShardSource`);
3. the batch's plan from the `Planner` every backend shares (the V crop windows per sample from the core
   sampler, image sizes from the index, boxes read live from the SampleState; with companions, one
   neighbour per sample from the state's neighbour table and its V windows), and the encoded bytes;
4. in the graph: `fn.decoders.image` once per image, then one `fn.resize` per view with the window as an
   absolute ROI. DALI orders `roi_start`/`roi_end` like the tensor shape, so for HWC images they are (y, x).

5. the views, uint8 (B, S, S, 3) as DALI made them, copied to torch and finished by the augmenter (the fused
   kernels on a GPU), one batch ahead of the consumer on a side CUDA stream (`Loader.hand_out`).

A box or neighbour update published in the SampleState is used by every batch the consumer receives from
the `prefetch`-th batch after the update on (`prefetch`: DALI's queue depth, plus one with the overlap's
look-ahead; batches already requested by DALI keep the old tables).
Because the callback owns the batch index, restarting at any batch is one mechanism for both mid-epoch
resume and recovery from an image that fails to decode (a failed DALI pipeline is rebuilt).

With `cfg.dali.plan_ahead` = N ≥ 1, steps 1-3 run off the consumer's thread (`_Ahead`): a daemon thread makes
the callback's outputs of the next N batches, which the callback takes in order; the batches are the same
(each restart — resume, epoch, replaced sample — starts a new thread at that batch, from the substitutes of
then), and an update arrives N batches later (`prefetch`: DALI's queue depth + N, plus one with overlap).
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch

from viewpipe.cuda_builds import import_dali
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines.base import Batch, Loader, Samples, register
from viewpipe.pipelines.config import LoaderConfig
from viewpipe.pipelines.plan import BatchPlan, Planner, sample_check
from viewpipe.sources import ImageSizes, ShardSource, Source
from viewpipe.torch_ops import resized_centre


class _Reader:
    """Encoded images and their sizes from any `Source`: a converted dataset's are read without a copy and
    sized by its index; other sources' sizes (after EXIF orientation) come from the image headers."""

    def __init__(self, source: Source) -> None:
        self.source, self.labels = source, np.asarray(source.labels, dtype=np.int64)
        self.shards = isinstance(source, ShardSource)
        self.sizes = ImageSizes(source)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, k: int) -> str:
        return self.source.describe(k)

    def read(self, k: int) -> np.ndarray:
        return self.source.view(k) if self.shards else np.frombuffer(self.source.read(k), dtype=np.uint8)


class _Ahead:
    """The callback's outputs of batches `first`, `first` + 1, ... `end` - 1, made in order by a daemon thread at
    most `depth` batches ahead of those taken (`take`, in the same order). An exception the thread meets is
    raised by the `take` of its batch; `stop` ends the thread (and it ends itself once the callback is gone)."""

    def __init__(self, make: Callable[[int], tuple], first: int, end: int, depth: int) -> None:
        self._slots, self._made, self._stopped = threading.Semaphore(depth), queue.SimpleQueue(), threading.Event()
        self._thread = threading.Thread(target=_make_ahead, name="viewpipe-dali-plan-ahead", daemon=True,
                                        args=(weakref.WeakMethod(make), range(first, end), self._slots, self._made,
                                              self._stopped))
        self._thread.start()

    def take(self, b: int) -> tuple:
        """Batch b's outputs (b: the batch after the one taken last), waiting for the thread."""
        while True:
            try:
                made, out = self._made.get(timeout=0.05)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._made.empty():
                    raise ViewpipeError(f"the DALI planning thread ended before batch {b}") from None
        self._slots.release()
        if made is None:
            raise out
        if made != b:
            raise ViewpipeError(f"the DALI planning thread made batch {made} where batch {b} was asked for")
        return out

    def stop(self) -> None:
        """End the thread (after the batch it is making) and drop what it made."""
        self._stopped.set()
        self._thread.join(timeout=60.0)


def _make_ahead(make: weakref.WeakMethod, batches: range, slots: threading.Semaphore, made: queue.SimpleQueue,
                stopped: threading.Event) -> None:
    """`_Ahead`'s thread: each batch's outputs once a slot is free, until stopped or the callback is gone."""
    try:
        for b in batches:
            while not slots.acquire(timeout=0.05):
                if stopped.is_set() or make() is None:
                    return
            fn = make()
            if stopped.is_set() or fn is None:
                return
            made.put((b, fn(b)))
            del fn
    except BaseException as exc:  # noqa: BLE001  (raised in the consumer by `take`)
        made.put((None, exc))


class _Callback:
    """The external-source callback: iteration `i` → batch `start + i` of the current epoch, planned by the
    shared `Planner`, as encoded images, labels, indices, [companion images and indices,] windows and per-view
    ROIs; made in the call, or with `ahead` ≥ 1 by a thread up to `ahead` batches before (`_Ahead`)."""

    def __init__(self, reader: _Reader, planner: Planner, ahead: int = 0) -> None:
        self.reader, self.planner, self.companions = reader, planner, planner.companions
        self.groups = planner.cfg.groups_of_views()  # each view's group, for its graph inputs
        self.epoch, self.start = 0, 0
        self.batches: list[np.ndarray] = []
        self.ahead, self._thread = ahead, None

    def plan(self, b: int) -> BatchPlan:
        return self.planner.plan(self.epoch, b, self.batches[b])

    def begin(self, b: int, batches: list[np.ndarray]) -> None:
        """Start at batch b of `batches` (of `epoch`); with `ahead`, a new thread making them from b on."""
        self.halt()
        self.start, self.batches = b, batches
        if self.ahead:
            self._thread = _Ahead(self.make, b, len(batches), self.ahead)

    def halt(self) -> None:
        """Stop making batches ahead (what was made is dropped: a restart plans again)."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def __call__(self, i: int) -> tuple:
        b = self.start + i
        if b >= len(self.batches):
            raise StopIteration
        return self.make(b) if self._thread is None else self._thread.take(b)

    def make(self, b: int) -> tuple:
        """Batch b's outputs: its plan's encoded images, labels, indices, [companions,] windows and ROIs."""
        plan = self.plan(b)
        out = [[self.reader.read(k) for k in plan.indices.tolist()], self.reader.labels[plan.indices], plan.indices]
        if plan.neighbours is not None:
            out += [[self.reader.read(k) for k in plan.neighbours.tolist()], plan.neighbours]
        out.append(plan.windows)
        for v in range(plan.windows.shape[1]):
            out += self.view_inputs(plan.windows[:, v], v % len(self.groups))
        return tuple(out)

    def view_inputs(self, windows: np.ndarray, v: int) -> list[np.ndarray]:
        """The graph's two per-sample inputs of view v: its window as an ROI (start, end), or for a clean view
        with a `resize` the resized size and the centre crop's start (torchvision's Resize + CenterCrop).
        (y, x) order: DALI follows the HWC shape order."""
        group = self.groups[v]
        if group.clean and group.resize:
            rc = resized_centre(windows[:, 2:4], group.size, group.resize).astype(np.float32)
            return [np.ascontiguousarray(rc[:, :2]), np.ascontiguousarray(rc[:, 2:])]
        start = windows[:, 0:2].astype(np.float32)
        return [start, start + windows[:, 2:4].astype(np.float32)]


def decode_graph(fn, types, device_id: int | None, hw_decoder_load: float):  # noqa: ANN001, ANN201
    """The graph's image decoder: nvJPEG (`device="mixed"`, `hw_decoder_load` to the hardware decoder) on a
    device, libjpeg-turbo in DALI's CPU mode (`device_id=None`); RGB, EXIF orientation applied."""

    def decode(jpegs):  # noqa: ANN001, ANN202
        if device_id is None:
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)

    return decode


def _build_pipeline(source: _Callback, cfg: LoaderConfig, device_id: int | None, num_threads: int,
                    hw_decoder_load: float, prefetch: int):  # noqa: ANN202  (a DALI Pipeline)
    """The graph: decode each image once, then one `fn.resize` per view with its window as the ROI."""
    dali = import_dali(gpu=device_id is not None)
    from nvidia.dali import fn, types

    V, sizes = cfg.views, cfg.view_sizes()
    n_views = 2 * V if source.companions else V
    dtypes = ([types.UINT8, types.INT64, types.INT64] + ([types.UINT8, types.INT64] if source.companions else [])
              + [types.INT32] + [types.FLOAT] * (2 * n_views))
    decode = decode_graph(fn, types, device_id, hw_decoder_load)
    groups = cfg.groups_of_views()

    def cut(images, v: int, a, b):  # noqa: ANN001, ANN202  (DALI DataNodes)
        """View v of the decoded images: its window (ROI a..b) resized to its size, or a clean view with a
        `resize`: the image resized to size a, then the size×size from b (`_Callback.view_inputs`)."""
        if groups[v].clean and groups[v].resize:
            full = fn.resize(images, size=a, antialias=True, interp_type=types.INTERP_LINEAR)
            return fn.slice(full, b, [float(sizes[v])] * 2, axes=[0, 1], normalized_anchor=False,
                            normalized_shape=False)
        return fn.resize(images, size=[sizes[v]] * 2, roi_start=a, roi_end=b, roi_relative=False, antialias=True,
                         interp_type=types.INTERP_LINEAR)

    @dali.pipeline_def(batch_size=cfg.batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=prefetch, seed=cfg.seed)
    def views_pipeline():  # noqa: ANN202
        jpegs, labels, indices, *rest = fn.external_source(
            source=source, num_outputs=len(dtypes), batch=True, parallel=False, cycle=None, dtype=dtypes)
        images = decode(jpegs)
        if source.companions:
            companion_jpegs, companion_indices, windows, *rois = rest
            companions = decode(companion_jpegs)
        else:
            (windows, *rois), companion_indices = rest, None
        views = [cut(images if v < V else companions, v % V, rois[2 * v], rois[2 * v + 1]) for v in range(n_views)]
        return (*views, labels, indices, windows) + ((companion_indices,) if source.companions else ())

    pipe = views_pipeline()
    pipe.build()
    return pipe


def _decode_failures(data: list[np.ndarray]) -> list[str | None]:
    """For each encoded image, why DALI's CPU decoder rejects it (None when it decodes): run one by one
    through a one-sample pipeline, rebuilt after each failure (a failed DALI pipeline cannot run again)."""
    dali = import_dali()
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                       exec_pipelined=False)
    def probe():  # noqa: ANN202
        return fn.decoders.image(fn.external_source(name="jpeg", dtype=types.UINT8), device="cpu",
                                 output_type=types.RGB)

    out: list[str | None] = []
    pipe = None
    for d in data:
        if pipe is None:
            pipe = probe()
            pipe.build()
        pipe.feed_input("jpeg", [d])
        try:
            pipe.run()
            out.append(None)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "failure" in ln or "rror" in ln]
            out.append(lines[-1] if lines else "cannot decode")
            pipe = None
    return out


def _to_torch(tl, device: torch.device) -> torch.Tensor:  # noqa: ANN001  (a DALI TensorList)
    """A dense DALI batch as a torch tensor on `device` (copied: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor())).to(device)


@register("dali")
class DaliLoader(Loader):
    """`Loader` whose images are decoded once by DALI and cut inside its graph (see the module), over a
    converted dataset folder (its WebDataset shards) or any `Source` (read file by file). `cfg.device`: a CUDA
    device decodes with nvJPEG (`device="mixed"`, `cfg.dali.hw_decoder_load` of it on the hardware decoder),
    the CPU runs DALI's CPU-only mode; `cfg.workers` DALI threads. `prefetch`: DALI's queue depth
    (`cfg.dali.prefetch_queue_depth`) plus `cfg.dali.plan_ahead` (batches planned by a thread before DALI asks
    for them, 0: none, planned in DALI's call), plus one batch with overlap. A sample that fails to decode is replaced
    by the next sample that decodes, for the rest of the run (the failed DALI pipeline is rebuilt)."""

    reads = "dali"
    preferred_on = ("cuda",)

    def __init__(self, source: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                 state: Any = None, *, rank: int | None = None, world: int | None = None) -> None:
        super().__init__(source, cfg, state, rank=rank, world=world)
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.hw_decoder_load, self.queue_depth = cfg.dali.hw_decoder_load, cfg.dali.prefetch_queue_depth
        self.num_threads = max(1, cfg.workers)
        self._source = self.make_callback()
        self._pipe = None
        self._running = False  # the pipeline has an epoch in flight that must be drained before the next

    def open(self, source: str | os.PathLike[str] | Source) -> Samples:
        import_dali()
        self.reader = _Reader(ShardSource(source) if isinstance(source, (str, os.PathLike)) else source)
        return Samples(len(self.reader), self.reader.sizes, self.reader.describe,
                       sample_check(self.reader.source, self.reader.sizes))

    def planned_ahead(self) -> int:
        return self.cfg.dali.prefetch_queue_depth + self.cfg.dali.plan_ahead

    @classmethod
    def baselines(cls) -> tuple[type[Loader], ...]:
        from viewpipe.pipelines.baselines import DaliCutLoader, DaliDecodeLoader, ExpertDaliLoader, StockDaliLoader

        return DaliDecodeLoader, DaliCutLoader, StockDaliLoader, ExpertDaliLoader

    def make_callback(self) -> _Callback:
        """The external source feeding the graph."""
        return _Callback(self.reader, self.planner, self.cfg.dali.plan_ahead)

    def _stop(self) -> None:
        """End the epoch in flight: the source stops at once, the batches DALI prefetched are collected, and
        the pipeline is rewound (a DALI pipeline can only be reset after its source has ended); the planning
        thread (`plan_ahead`) is stopped first."""
        self._source.halt()
        if self._pipe is not None and self._running:
            self._source.batches = []
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                self._pipe.reset()
        self._running = False

    def _start(self, b: int, batches: list[np.ndarray]) -> None:
        """(Re)start the pipeline at batch `b` of `batches` (a failed pipeline is rebuilt)."""
        self._stop()
        self._source.begin(b, batches)
        if self._pipe is None:
            self._pipe = self._new_pipeline()
        self._running = True

    def _new_pipeline(self):  # noqa: ANN202  (a DALI Pipeline)
        """A built DALI pipeline over `self._source` (a new one after a failure: a failed one cannot run)."""
        return _build_pipeline(self._source, self.cfg, self.device_id, self.num_threads, self.hw_decoder_load,
                               self.queue_depth)

    def _replace_failures(self, b: int, error: RuntimeError) -> None:
        """Find the samples that do not decode in batch `b` (or else in the batches DALI had prefetched after
        it), mark them replaced, or re-raise `error` when every image decodes (not a data error)."""
        failed: dict[int, str] = {}
        for later in range(b, min(b + self.queue_depth + 1, len(self._source.batches))):
            plan = self._source.plan(later)
            suspects = list(dict.fromkeys(plan.indices.tolist() + ([] if plan.neighbours is None
                                                                    else plan.neighbours.tolist())))
            why = _decode_failures([self.reader.read(k) for k in suspects])
            failed = {k: w for k, w in zip(suspects, why) if w is not None}
            if failed:
                break
        if not failed:
            raise error
        self.substitutes.add({k: f"fails to decode ({w})" for k, w in failed.items()})

    def pending(self) -> Iterator[tuple[int, Callable[[], tuple]]]:
        """(b, the function that makes batch b from DALI's outputs) for the rest of the epoch; DALI's outputs are
        copied by that function, which runs before the pipeline runs again."""
        src = self._source
        batches, b = self.batches(), self._next
        self._stop()
        src.epoch = self.epoch
        if b < len(batches):
            self._start(b, batches)
        while b < len(batches):
            try:
                out = self._pipe.run()
            except RuntimeError as exc:  # a sample that does not decode: replace it and restart at this batch
                self._pipe, self._running = None, False  # a DALI pipeline that failed cannot run again
                self._source.halt()  # (its batches ahead were planned with the old substitutes)
                self._replace_failures(b, exc)
                self._start(b, batches)
                continue
            yield b, partial(self._batch, out, self._source.planner.seed(self.epoch, b))
            b += 1
        self._stop()

    def _batch(self, out: tuple, seed: int) -> Batch:
        """A batch from DALI's outputs: the views copied to torch and augmented (photometric draws from a torch
        Generator seeded with `seed`), labels, indices, neighbours, windows."""
        n_views = 2 * self.cfg.views if self._source.companions else self.cfg.views
        labels = torch.from_numpy(np.array(out[n_views].as_tensor()).reshape(-1))
        indices = torch.from_numpy(np.array(out[n_views + 1].as_tensor()).reshape(-1))
        gen = torch.Generator().manual_seed(seed)
        views = [_to_torch(out[v], self.device) for v in range(n_views)]  # uint8 (B, S, S, 3)
        views = [self.finisher.finish(x, v, gen, layout="hwc") for v, x in enumerate(views)]
        neighbours = (torch.from_numpy(np.array(out[n_views + 3].as_tensor()).reshape(-1))
                      if self._source.companions else None)
        return Batch(views, labels, indices, neighbours, torch.from_numpy(np.array(out[n_views + 2].as_tensor())))

    def close(self) -> None:
        self._source.halt()  # (before the shards it reads are closed)
        self._pipe = None
        getattr(self.reader.source, "close", lambda: None)()

