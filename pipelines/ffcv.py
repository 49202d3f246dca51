"""The FFCV backend: each JPEG of a converted `.beton` decoded once on FFCV's CPU threads by a custom FFCV
decoder, the V ContrastiveCrop windows of every sample from the core's numba kernel with the sample's box read
live from the SampleState, crops, resizes and photometric augmentations in torch on the views' device (the
GPU, or the CPU without one).

Data flow per batch (FFCV's producer thread runs up to `batches_ahead` batches ahead of the consumer):

1. the batch's sample indices: `epoch_batches(n, cfg, epoch, rank, world)`, a pure function of
   (seed, epoch, rank, world), given to FFCV as a custom `TraversalOrder` (FFCV's `distributed=True` shards
   with it) and decoded batch by batch as listed (FFCV alone would cut a flat order into full batches, which
   cannot express the equal-count split of `epoch_batches` without drop_last);
2. in Python, on FFCV's producer thread right before the batch is decoded: the batch's plan from the
   `Planner` every backend shares (the crop draws from `default_rng([seed, epoch, rank, batch])`, the boxes
   read from the SampleState: `state.boxes(indices)`, the seqlock-checked copy of the live table; with
   companions, one neighbour per sample from `state.neighbours(indices)` and its windows). The windows and
   companions go into the decoder's per-slot FFCV buffers, so the
   compiled code captures no table: numba freezes a captured array into the compiled code (a copy up to
   1 MB, a reference above), and a frozen copy would never see an update, nor would compiled code see the
   double buffer switch of a referenced one;
3. the compiled decoder (`_decode_batch`, `prange` over the batch on FFCV's threads): each sample's JPEG (and
   its companion's) decoded once by libffcv's `imdecode` (libjpeg-turbo; raw samples are copied) into a
   padded (Hmax, Wmax, 3) slot sized from the .beton metadata's largest height and width (as FFCV's own
   decoders size theirs), its last row and column repeated once so that bilinear samples at the image's edge
   never see padding. It records per image the index, size and number of decodes (`FfcvLoader.decodes`).
   With `fused=True` it instead cuts and resizes every view to S×S from the decoded image (libffcv's
   `resize`: OpenCV INTER_AREA, what FFCV's RandomResizedCropRGBImageDecoder does);
4. in the consumer: the decoded uint8 slot goes to the device, every view is cut and resized from it
   (`Augmenter.forward`: on a GPU Triton's crop kernel reads the uint8 slot with 64-bit offsets; on the CPU
   roi_align) and finished with a `torch.Generator` seeded from (seed, epoch, rank, batch), one batch ahead of
   the consumer on a side CUDA stream (`EpochPosition.hand_out`). (The first GPU run crashed with "illegal
   memory access": the slot was converted to one float tensor of B×3×h×w values, over 2^31 for natural-size
   images, which roi_align indexes with 32-bit integers.)

Live state: a box or neighbour update published after the consumer received batch u is used by every batch
from u + `prefetch` on, `prefetch = batches_ahead + 2 (+ 1 with the overlap's look-ahead)` (the batches already queued, the one FFCV's thread may
be preparing, and the one it starts as soon as the consumer frees a place). The table's size does not matter.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import torch
from numba import prange

from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import BETON
from viewpipe.pipelines import (Batch, EpochPosition, LoaderConfig, Planner, Substitutes, check_state,
                                ViewFinisher, dist_rank_world, epoch_batches, resolve_overlap)
from viewpipe.state import SampleState

_GOT = 5  # per decoded image: sample index, height, width, decodes, libjpeg-turbo status


def _import_ffcv() -> None:
    """Import ffcv, or raise a one-line ViewpipeError. ffcv 1.0.2 imports `distutils`, which Python 3.12
    removed: setuptools provides it (its `distutils-precedence.pth` shim, active at start-up unless
    SETUPTOOLS_USE_DISTUTILS=stdlib; importing setuptools installs the same shim when the .pth did not run)."""
    try:
        import distutils.log  # noqa: F401
    except ImportError:
        try:
            import setuptools  # noqa: F401  (puts setuptools' distutils in place)
        except ImportError:
            pass
    try:
        import distutils.log  # noqa: F401,F811
    except ImportError as exc:
        raise ViewpipeError(f"ffcv 1.0.2 imports distutils, which this Python ({sys.version.split()[0]}) lacks "
                            f"({exc}); install setuptools>=68 (pip install 'viewpipe[ffcv]') and leave "
                            "SETUPTOOLS_USE_DISTUTILS unset") from None
    import_optional("ffcv.loader", "ffcv", "FFCV")


def _decode_batch(imdecode, resize, memmove, batch_indices, want, metadata, storage_state, windows, images, temp, got,
                  n_images, V, fused):  # noqa: ANN001, ANN202
    """The compiled decoder's body (numba, `prange` over the batch on FFCV's threads): each sample (and its
    companion, `want`) read from the mapped .beton and decoded once by libjpeg-turbo (`imdecode`; raw samples
    are copied). Unfused: the image stays in its padded (Hmax, Wmax, 3) slot of `images`, its last row and
    column repeated once. Fused: every view's window is cut and resized to S×S from it (libffcv's `resize`,
    OpenCV INTER_AREA) into `images` (B, n_views, S, S, 3). `got` records per image: index, height, width,
    decodes and libjpeg-turbo's status. The C functions (libffcv's, libc's memmove) come in as arguments, so
    the compiled code holds no address of this process and numba can cache it on disk. (Rows move with
    memmove: an overlapping slice copy inside `prange` came out corrupted with numba 0.68.)"""
    mm, ptrs, sizes = storage_state  # FFCV's OS-cache reader state: the mapped file and its allocations
    Hp, Wp = images.shape[2], images.shape[3]
    for n in prange(len(batch_indices)):
        for i in range(n_images):
            k = np.int64(batch_indices[n]) if i == 0 else want[n, 0]
            field = metadata[k]
            H, W = np.int64(field["height"]), np.int64(field["width"])
            ptr = field["data_ptr"]
            data = mm[ptr : ptr + sizes[np.searchsorted(ptrs, ptr)]]
            got[n, i, 0], got[n, i, 1], got[n, i, 2], got[n, i, 3], got[n, i, 4] = k, H, W, 0, 0
            npix = H * W * 3
            if fused:
                if field["mode"] == 0:  # jpg
                    got[n, i, 4] = imdecode(data.ctypes.data, data.size, H, W, temp[n].ctypes.data, H, W, 0, 0, 1, 1,
                                            False, False)
                else:  # raw pixels
                    temp[n, :npix] = data[:npix]
                got[n, i, 3] += 1
                for v in range(i * V, (i + 1) * V):
                    top, left, h, w = windows[n, v, 0], windows[n, v, 1], windows[n, v, 2], windows[n, v, 3]
                    out = images[n, v]
                    resize(0, temp[n].ctypes.data, H, W, top, top + h, left, left + w, out.ctypes.data,
                           out.shape[0], out.shape[1])
            else:
                dst = images[n, i]
                if field["mode"] == 0:
                    flat = dst.reshape(-1)
                    got[n, i, 4] = imdecode(data.ctypes.data, data.size, H, W, flat.ctypes.data, H, W, 0, 0, 1, 1,
                                            False, False)
                    for row in range(H - 1, 0, -1):  # tight rows -> the slot's pitch, last row first
                        memmove(flat.ctypes.data + row * Wp * 3, flat.ctypes.data + row * W * 3, W * 3)
                else:
                    dst[:H, :W] = data[:npix].reshape(H, W, 3)
                got[n, i, 3] += 1
                if H < Hp:  # repeat the last row and column once: roi_align's bilinear reach past the edge
                    dst[H, :W] = dst[H - 1, :W]
                if W < Wp:
                    dst[: min(H + 1, Hp), W] = dst[: min(H + 1, Hp), W - 1]


def _quiet_stale_dispatcher_finalizers() -> None:
    """ffcv 1.0.2 sets `mutable = False` on a numba array type each time a Loader is made
    (`OSCacheManager.state_type`), which changes the hash of signatures its own decoders compiled with: their
    dispatchers' finalizers then raise a KeyError when collected (nothing leaks: the process's code stays).
    Python prints those as "Exception ignored"; this hook drops exactly that case and passes on the rest."""
    previous = sys.unraisablehook

    def hook(u) -> None:  # noqa: ANN001
        tb = u.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code if tb is not None else None
        if (isinstance(u.exc_value, KeyError) and where is not None and where.co_name == "finalizer"
                and where.co_filename.endswith(os.path.join("numba", "core", "dispatcher.py"))):
            return
        previous(u)

    sys.unraisablehook = hook


@cache
def _ffcv() -> SimpleNamespace:
    """The FFCV classes of this backend and the compiled decoder, built once per process on first use (ffcv
    is imported lazily, so `viewpipe.pipelines.ffcv` imports without it)."""
    _import_ffcv()
    _quiet_stale_dispatcher_finalizers()
    from dataclasses import replace

    import numba
    from ffcv.fields.basics import IntDecoder
    from ffcv.libffcv import ctypes_imdecode, ctypes_resize
    from ffcv.loader.epoch_iterator import EpochIterator, select_buffer
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
    from ffcv.traversal_order.base import TraversalOrder
    from numba import types
    from numba.core.types.function_type import CompileResultWAP

    try:  # cached on disk (beside this file, or numba's user cache): ~10 s of compiling once per machine
        decode_batch = numba.njit(parallel=True, nogil=True, cache=True)(_decode_batch)
    except RuntimeError:  # no writable cache location
        decode_batch = numba.njit(parallel=True, nogil=True)(_decode_batch)
    compiled: dict = {}

    def decode_fn(metadata: np.ndarray) -> CompileResultWAP:
        """`decode_batch` compiled for the buffers FFCV passes, as a first-class function: FFCV compiles each
        loader's decoder anew, and a call through an address keeps that compile small (calling the dispatcher
        would link, and re-optimise, all of `decode_batch` into every loader's code: ~1 s more each)."""
        def arr(dtype, ndim: int, readonly: bool = False):  # noqa: ANN001, ANN202
            return types.Array(dtype, ndim, "C", readonly=readonly)

        state = types.Tuple((arr(types.uint8, 1, True), arr(types.uint64, 1), arr(types.uint64, 1)))
        sig = types.void(numba.typeof(ctypes_imdecode), numba.typeof(ctypes_resize), numba.typeof(ctypes.memmove),
                         arr(types.int64, 1), arr(types.int64, 2), numba.typeof(metadata), state, arr(types.int32, 3),
                         arr(types.uint8, 5), arr(types.uint8, 2), arr(types.int64, 3), types.int64, types.int64,
                         types.boolean)
        if sig not in compiled:
            decode_batch.compile(sig.args)
            compiled[sig] = CompileResultWAP(decode_batch.overloads[sig.args])
        return compiled[sig]

    class ViewDecoder(Operation):
        """Decodes each image (and its companion) once; see `_decode_batch`. Its FFCV buffers per sample:
        images, temp (the fused decode), want (the companion's index, written in Python), got (what was
        decoded), windows (written in Python)."""

        def __init__(self, n_images: int, views: int, fused: bool, size: int) -> None:
            super().__init__()
            self.n_images, self.V, self.fused, self.size = n_images, views, fused, size

        def declare_state_and_memory(self, previous_state: State):  # noqa: ANN201
            H, W = int(self.metadata["height"].max()), int(self.metadata["width"].max())
            nv, S = self.n_images * self.V, self.size
            shape = (nv, S, S, 3) if self.fused else (self.n_images, H, W, 3)
            u1, i8 = np.dtype("u1"), np.dtype("<i8")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=u1), (
                AllocationQuery(shape, u1),
                AllocationQuery((H * W * 3 if self.fused else 1,), u1),
                AllocationQuery((1,), i8),
                AllocationQuery((self.n_images, _GOT), i8),
                AllocationQuery((nv, 4), np.dtype("<i4")),
            ))

        def generate_code(self):  # noqa: ANN201
            n_images, V, fused = self.n_images, self.V, self.fused
            decode_batch, imdecode, resize = decode_fn(self.metadata), ctypes_imdecode, ctypes_resize
            memmove = ctypes.memmove

            def decode(batch_indices, storage, metadata, storage_state):  # noqa: ANN001, ANN202
                images, temp, want, got, windows = storage
                decode_batch(imdecode, resize, memmove, batch_indices, want, metadata, storage_state, windows,
                             images, temp, got, n_images, V, fused)
                return images[: len(batch_indices)]

            return decode

    class IndexDecoder(IntDecoder):
        """Over any scalar field: emits the batch's sample indices (for the stock loader)."""

        def generate_code(self):  # noqa: ANN201
            def decoder(indices, destination, metadata, storage_state):  # noqa: ANN001, ANN202
                for ix in range(len(indices)):
                    destination[ix, 0] = indices[ix]
                return destination[: len(indices)]

            return decoder

    class EpochOrder(TraversalOrder):
        """`epoch_batches` as an FFCV traversal order. FFCV's own orders shard with torch's
        DistributedSampler, which repeats samples to even out ranks and permutes with torch's generator;
        this one shards like every viewpipe backend when FFCV's `distributed` flag is set. ffcv 1.0.2 calls
        the TraversalOrder instance it is given with the loader, hence `__call__`."""

        def __init__(self, owner: FfcvLoader) -> None:  # noqa: F821
            self.owner = owner

        def __call__(self, loader) -> EpochOrder:  # noqa: ANN001
            TraversalOrder.__init__(self, loader)
            return self

        def batches(self, epoch: int) -> list[np.ndarray]:
            o = self.owner
            rank, world = (o.rank, o.world) if self.distributed else (0, 1)
            return epoch_batches(o.num_samples, o.cfg, epoch, rank, world)

        def sample_order(self, epoch: int) -> np.ndarray:
            b = self.batches(epoch)
            return np.concatenate(b) if b else np.zeros(0, np.int64)

    class Epoch(EpochIterator):
        """FFCV's epoch thread over exactly `batches` (FFCV would chunk a flat order into full batches);
        `prepare(b, indices, storage)` fills the decoder's buffers in Python right before batch b is decoded.
        Each result is FFCV's outputs plus the decoder's buffers for that batch."""

        def __init__(self, loader, batches: list[np.ndarray], node: int | None, prepare) -> None:  # noqa: ANN001
            self.exact, self.node, self.prepare, self.error = batches, node, prepare, None
            B = loader.batch_size
            super().__init__(loader, np.zeros((len(batches) - 1) * B + 1 if batches else 0, np.int64))

        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):  # noqa: ANN001, ANN201
            if self.terminate_event.is_set():
                raise StopIteration  # FFCV's thread ends the epoch
            try:
                indices = np.ascontiguousarray(self.exact[b_ix], dtype=np.int64)
                storage = None
                if self.node is not None:
                    storage = select_buffer(self.memory_allocations["operation"][self.node], batch_slot, len(indices))
                    self.prepare(b_ix, indices, storage)
                return (*super().run_pipeline(b_ix, indices, batch_slot, cuda_event), storage)
            except Exception as exc:  # reported by the consumer instead of killing the thread silently
                self.error = exc
                raise StopIteration from exc

        def stop(self) -> None:
            """End the thread: it stops before its next batch; drain the queue so that it never blocks."""
            self.close()
            while self.is_alive():
                while not self.output_queue.empty():
                    self.output_queue.get_nowait()
                self.join(0.02)

    return SimpleNamespace(ViewDecoder=ViewDecoder, IndexDecoder=IndexDecoder, EpochOrder=EpochOrder, Epoch=Epoch,
                           IntDecoder=IntDecoder)


def _beton(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    beton = p if p.suffix == ".beton" else p / BETON
    if not beton.is_file():
        raise ViewpipeError(f"{p}: no FFCV dataset ({beton.name} is missing); convert it first: "
                            f"viewpipe convert SRC {p} --format ffcv")
    return beton


class FfcvLoader(EpochPosition):
    """Iterable of `Batch`es (views, labels, indices, neighbours, windows) on the loader's device; with
    `companions` 2V views (views[:V] of each sample, views[V:] of one of its neighbours, drawn uniformly from
    the SampleState's neighbour table; view V + v uses view v's augmentation) and the neighbours' indices.

    `device="auto"`: CUDA when available, else the CPU. `rank`/`world` default to torch.distributed's when it
    is initialised (then FFCV runs with `distributed=True` and this backend's order). `batches_ahead`: FFCV's
    queue; `prefetch = batches_ahead + 2`, plus one with `overlap`, bounds how late a box or neighbour update
    arrives. `overlap` (default: on with CUDA): batch b + 1 is cut and augmented on a side stream while the
    consumer has batch b. `fused`: crop and
    resize on FFCV's CPU threads as FFCV's own decoders do (OpenCV INTER_AREA: an area average when
    shrinking, close to the default path; blocky, nearest-neighbour-like, when enlarging), only the
    photometric steps on the device.
    `decode_only`: batches `(None, labels, indices)`, the decode ceiling. `stock`: FFCV's own
    RandomResizedCropRGBImageDecoder, one decode per view (the FFCV-SSL way; no boxes, no windows).
    `decodes` counts, per sample, the images the compiled decoder produced. One iterator at a time; starting a
    new one ends the previous one. `state_dict()` / `load_state_dict()` resume mid-epoch with the same
    batches, windows and augmentations."""

    def __init__(self, data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, *, device: str | torch.device = "auto", rank: int | None = None,
                 world: int | None = None, companions: bool = False,
                 fused: bool = False, batches_ahead: int = 2, num_threads: int | None = None,
                 decode_only: bool = False, stock: bool = False, overlap: bool | None = None) -> None:
        _import_ffcv()
        beton = _beton(data)
        ns = _ffcv()
        import numba
        from ffcv.fields import RGBImageField
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline.graph import DecoderNode
        from ffcv.pipeline.pipeline_spec import PipelineSpec
        from ffcv.reader import Reader

        reader = Reader(str(beton))
        names = list(reader.handlers)
        if "image" not in names or not isinstance(reader.handlers["image"], RGBImageField) or "label" not in names:
            raise ViewpipeError(f"{beton}: expected the fields image (RGBImageField) and label, found {names}; "
                                "convert it with viewpipe convert")
        self.num_samples = int(reader.num_samples)
        check_state(state, self.num_samples, companions)
        if stock and (companions or fused):
            raise ViewpipeError("the stock FFCV loader makes no companions or fused crops")
        meta = reader.metadata[f"f{names.index('image')}"]
        self._sizes = np.stack([meta["height"], meta["width"]], 1).astype(np.int64)  # (N, 2)
        self.max_size = (int(meta["height"].max()), int(meta["width"].max()))
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.rank, self.world = dist_rank_world(rank, world)
        self.cfg, self.state, self.companions = cfg, state, companions
        self.fused, self.decode_only, self.stock = fused and not decode_only, decode_only, stock
        self.overlap = resolve_overlap(overlap, self.device)
        self.batches_ahead, self.prefetch = batches_ahead, batches_ahead + 2 + int(self.overlap)
        self.num_threads = max(1, min(num_threads or cfg.workers or 1, numba.config.NUMBA_NUM_THREADS))
        EpochPosition.__init__(self)
        self.decodes = np.zeros(self.num_samples, np.int64)
        self.substitutes = Substitutes(self.num_samples, lambda k: f"{beton} (sample {k})")
        self._planner = Planner(cfg, self.rank, state, self.substitutes, lambda k: self._sizes[k], companions)
        self._finisher = ViewFinisher(cfg)
        self._epoch = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        V, groups = cfg.views, cfg.view_groups()
        if self.fused and len({g.size for g in groups}) > 1:
            raise ViewpipeError("fused=True cuts every view to one size on FFCV's threads; multi-crop view groups of "
                                "several sizes need the default path (fused=False)")
        self._n_images = 2 if companions else 1
        if stock:
            rrc = [RandomResizedCropRGBImageDecoder((groups[g].size,) * 2, scale=groups[g].scale, ratio=cfg.crop.ratio)
                   for g in cfg.group_of_views()]
            pipelines = {"image": PipelineSpec("image", decoder=rrc[0]),
                         "label": PipelineSpec("label", decoder=ns.IntDecoder())}
            pipelines |= {f"image_{v}": PipelineSpec("image", decoder=rrc[v]) for v in range(1, V)}
            pipelines["index"] = PipelineSpec("label", decoder=ns.IndexDecoder())
            self._decoder = None
        else:
            self._decoder = ns.ViewDecoder(self._n_images, 0 if decode_only else V, self.fused, groups[0].size)
            pipelines = {"image": PipelineSpec("image", decoder=self._decoder),
                         "label": PipelineSpec("label", decoder=ns.IntDecoder())}
        self._order = ns.EpochOrder(self)
        threads = torch.get_num_threads()  # FFCV sets torch's threads to its own count: keep the caller's
        try:
            self._loader = Loader(str(beton), batch_size=cfg.batch_size, num_workers=self.num_threads,
                                  os_cache=True, order=self._order, distributed=self.world > 1, seed=cfg.seed,
                                  pipelines=pipelines, drop_last=cfg.drop_last, batches_ahead=batches_ahead)
        finally:
            torch.set_num_threads(threads)
        graph = self._loader.graph
        self._node = next((n.id for n in graph.nodes if isinstance(n, DecoderNode) and n.decoder is self._decoder),
                          None) if self._decoder is not None else None

    # ------------------------------------------------------------------ the producer side (FFCV's thread)
    def _plan(self, epoch: int, start: int):  # noqa: ANN202
        """What FFCV's thread calls right before decoding batch `start + b_ix`: the batch's plan (the shared
        `Planner`: windows from the live boxes, companions) into the decoder's buffers."""

        def prepare(b_ix: int, indices: np.ndarray, storage: tuple) -> None:
            _, _, companion, _, windows = storage
            if self.decode_only:
                return
            plan = self._planner.plan(epoch, start + b_ix, indices)
            windows[:] = plan.windows
            if plan.neighbours is not None:
                companion[:, 0] = plan.neighbours

        return prepare

    def _stop(self) -> None:
        """End the epoch in flight (FFCV's thread is stopped and joined)."""
        if self._epoch is not None:
            self._epoch.stop()
            self._epoch = None

    # ------------------------------------------------------------------ the consumer side
    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A uint8 batch from FFCV's slot on the device. FFCV refills the slot once the next batches are
        asked for, so the copy is complete before this returns (on a side stream: no wait for the GPU's
        other work)."""
        t = torch.from_numpy(array)
        if self._copy_stream is None:
            return t
        with torch.cuda.stream(self._copy_stream):
            out = t.to(self.device, non_blocking=True)
        self._copy_stream.synchronize()
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        return out

    def _views(self, images: np.ndarray, got: np.ndarray, windows: np.ndarray, gen: torch.Generator) -> list:
        """The batch's views from FFCV's decoded slot: uploaded, cut and resized (`Augmenter.forward`: Triton
        reading the uint8 slot on a GPU, roi_align on the CPU), then finished; view V + v like view v."""
        V = self.cfg.views
        x = self._to_device(images)
        if self.fused:  # (B, n_views, S, S, 3), cut and resized on FFCV's threads
            return [self._finisher.finish(x[:, v], v, gen, layout="hwc") for v in range(V * self._n_images)]
        Hp, Wp = self.max_size  # (B, n_images, Hmax, Wmax, 3)
        views = []
        for i in range(self._n_images):  # cut to the batch's largest image (+ the repeated row/column)
            h, w = min(Hp, int(got[:, i, 1].max()) + 1), min(Wp, int(got[:, i, 2].max()) + 1)
            views += self._finisher.crop_and_finish(x[:, i, :h, :w], windows[:, i * V : (i + 1) * V], gen, "hwc")
        return views

    def _stock_views(self, result: tuple, gen: torch.Generator) -> list:
        V = self.cfg.views
        images = [result[0]] + list(result[2 : 2 + V - 1])
        return [self._finisher.finish(self._to_device(x), v, gen, layout="hwc") for v, x in enumerate(images)]

    def _record(self, got: np.ndarray) -> None:
        """Count decodes per sample."""
        for i in range(self._n_images):
            np.add.at(self.decodes, got[:, i, 0], got[:, i, 3])

    def _failures(self, got: np.ndarray) -> dict[int, str]:
        """The samples of a decoded batch libjpeg-turbo reported an error or warning for (damaged data: their
        pixels may be incomplete), index → why."""
        return {int(k): f"fails to decode (libjpeg-turbo status {int(status)}: damaged data)"
                for i in range(self._n_images) for k, status in got[np.flatnonzero(got[:, i, 4]), i][:, [0, 4]]}

    def __iter__(self) -> Iterator[tuple]:
        return self.hand_out(self.epoch, len(self.batches()), self._pending())

    def _pending(self) -> Iterator[tuple[int, Callable[[], tuple]]]:
        """(b, the function that makes batch b from FFCV's result) for the rest of the epoch. Each function
        runs before FFCV's next result is taken, while FFCV's thread keeps the slot it reads."""
        ns = _ffcv()
        epoch, b = self.epoch, self._next
        batches = [self.substitutes(x) for x in self.batches(epoch)]
        self._stop()
        mine = None
        try:
            if b < len(batches):
                self._epoch = mine = ns.Epoch(self._loader, batches[b:], self._node, self._plan(epoch, b))
            while b < len(batches):
                try:
                    result = next(mine)
                except StopIteration:
                    error = mine.error
                    raise (error if error is not None else RuntimeError("FFCV's epoch thread ended early")) from None
                failed = {} if self.stock else self._failures(result[-1][3])
                if failed:  # replace them from now on and decode this batch again, from the new plan
                    self._stop()
                    self.substitutes.add(failed)
                    batches = [self.substitutes(x) for x in self.batches(epoch)]
                    self._epoch = mine = ns.Epoch(self._loader, batches[b:], self._node, self._plan(epoch, b))
                    continue
                yield b, partial(self._batch, result, batches[b], self._planner.seed(epoch, b))
                b += 1
        finally:
            if self._epoch is mine:  # (an abandoned iterator never stops a newer one)
                self._stop()

    def _batch(self, result: tuple, expected: np.ndarray, seed: int) -> Batch:
        """The `Batch` of FFCV's result for one batch."""
        labels = torch.from_numpy(np.asarray(result[1]).reshape(-1).astype(np.int64))
        gen = torch.Generator().manual_seed(seed)
        if self.stock:
            indices = torch.from_numpy(np.asarray(result[-2]).reshape(-1).astype(np.int64))
            return Batch(self._stock_views(result, gen), labels, indices)
        images, _, _, got, windows = result[-1]
        indices = torch.from_numpy(got[:, 0, 0].copy())
        if not np.array_equal(indices.numpy(), expected):  # the decoder saw other samples: a bug
            raise RuntimeError(f"FFCV decoded samples {indices.tolist()}, expected {expected.tolist()}")
        self._record(got)
        if self.decode_only:
            return Batch(None, labels, indices)
        neighbours = torch.from_numpy(got[:, 1, 0].copy()) if self.companions else None
        return Batch(self._views(images, got, windows, gen), labels, indices, neighbours,
                     torch.from_numpy(windows.copy()))

    def close(self) -> None:
        self._stop()


def ffcv_loader(data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                state: SampleState | None = None, **kwargs) -> FfcvLoader:  # noqa: ANN003
    """An FFCV loader over a converted dataset folder (its `data.beton`) or a .beton file. See `FfcvLoader`."""
    return FfcvLoader(data, cfg, state, **kwargs)


def stock_rrc_loader(data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                     state: SampleState | None = None, **kwargs) -> FfcvLoader:  # noqa: ANN003
    """FFCV's stock RandomResizedCropRGBImageDecoder, one JPEG decode per view (the FFCV-SSL way: V image
    pipelines over the same field), the same photometric augmentation on the device: the benchmark's
    baseline. Batches `(views, labels, indices)`; the state (boxes) is ignored: this decoder cannot see
    sample indices."""
    return FfcvLoader(data, cfg, None, stock=True, **kwargs)
