"""The FFCV side of the FFCV backend (`viewpipe.pipelines.ffcv`): the compiled decoder and the FFCV classes it
plugs in — the decoder `Operation`, a traversal order, an epoch thread. Importing this module imports ffcv
(the backend imports it lazily, after checking ffcv is installed), so every class here is a plain module-level
class that readers, IDEs and tests can see.

The decoder's FFCV buffers, per sample of a batch slot:

- `images`: the decoded image in a padded (Hmax, Wmax, 3) slot (companion in a second slot), or with `fused`
  every view already cut and resized to S×S;
- `temp`: the full decoded image for the fused path's resizes;
- `companion`: the index of the sample's companion (CsMl's neighbour), written in Python from the batch plan;
- `decoded`: per decoded image, DECODED_FIELDS int64 values: sample index, height, width, number of decodes
  and libjpeg-turbo's status (non-zero: an error or warning, damaged data);
- `windows`: every view's crop window (top, left, h, w), written in Python from the batch plan.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
import numba
from numba import prange
from ffcv.fields.basics import IntDecoder  # (the label decoder: `ops.IntDecoder` in the loaders)
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.loader.epoch_iterator import EpochIterator, select_buffer
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.traversal_order.base import TraversalOrder
from numba import types
from numba.core.types.function_type import CompileResultWAP

from viewpipe.pipelines import epoch_batches


DECODED_FIELDS = 5  # per decoded image: sample index, height, width, decodes, libjpeg-turbo status


def _decode_batch(imdecode, resize, memmove, batch_indices, companion, metadata, storage_state, windows, images,
                  temp, decoded, n_images, V, fused):  # noqa: ANN001, ANN202
    """The compiled decoder's body (numba, `prange` over the batch on FFCV's threads): each sample (and its
    companion, whose index is in `companion`) read from the mapped .beton and decoded once by libjpeg-turbo (`imdecode`; raw samples
    are copied). Unfused: the image stays in its padded (Hmax, Wmax, 3) slot of `images`, its last row and
    column repeated once. Fused: every view's window is cut and resized to S×S from it (libffcv's `resize`,
    OpenCV INTER_AREA) into `images` (B, n_views, S, S, 3). `decoded` records per image: index, height, width,
    decodes and libjpeg-turbo's status. The C functions (libffcv's, libc's memmove) come in as arguments, so
    the compiled code holds no address of this process and numba can cache it on disk. (Rows move with
    memmove: an overlapping slice copy inside `prange` came out corrupted with numba 0.68.)"""
    mm, ptrs, sizes = storage_state  # FFCV's OS-cache reader state: the mapped file and its allocations
    Hp, Wp = images.shape[2], images.shape[3]
    for n in prange(len(batch_indices)):
        for i in range(n_images):
            k = np.int64(batch_indices[n]) if i == 0 else companion[n, 0]
            field = metadata[k]
            H, W = np.int64(field["height"]), np.int64(field["width"])
            ptr = field["data_ptr"]
            data = mm[ptr : ptr + sizes[np.searchsorted(ptrs, ptr)]]
            decoded[n, i, 0], decoded[n, i, 1], decoded[n, i, 2], decoded[n, i, 3], decoded[n, i, 4] = k, H, W, 0, 0
            npix = H * W * 3
            if fused:
                if field["mode"] == 0:  # jpg
                    decoded[n, i, 4] = imdecode(data.ctypes.data, data.size, H, W, temp[n].ctypes.data, H, W, 0, 0, 1, 1,
                                            False, False)
                else:  # raw pixels
                    temp[n, :npix] = data[:npix]
                decoded[n, i, 3] += 1
                for v in range(i * V, (i + 1) * V):
                    top, left, h, w = windows[n, v, 0], windows[n, v, 1], windows[n, v, 2], windows[n, v, 3]
                    out = images[n, v]
                    resize(0, temp[n].ctypes.data, H, W, top, top + h, left, left + w, out.ctypes.data,
                           out.shape[0], out.shape[1])
            else:
                dst = images[n, i]
                if field["mode"] == 0:
                    flat = dst.reshape(-1)
                    decoded[n, i, 4] = imdecode(data.ctypes.data, data.size, H, W, flat.ctypes.data, H, W, 0, 0, 1, 1,
                                            False, False)
                    for row in range(H - 1, 0, -1):  # tight rows -> the slot's pitch, last row first
                        memmove(flat.ctypes.data + row * Wp * 3, flat.ctypes.data + row * W * 3, W * 3)
                else:
                    dst[:H, :W] = data[:npix].reshape(H, W, 3)
                decoded[n, i, 3] += 1
                if H < Hp:  # repeat the last row and column once: roi_align's bilinear reach past the edge
                    dst[H, :W] = dst[H - 1, :W]
                if W < Wp:
                    dst[: min(H + 1, Hp), W] = dst[: min(H + 1, Hp), W - 1]



try:  # cached on disk (beside this file, or numba's user cache): ~10 s of compiling once per machine
    decode_batch = numba.njit(parallel=True, nogil=True, cache=True)(_decode_batch)
except RuntimeError:  # no writable cache location
    decode_batch = numba.njit(parallel=True, nogil=True)(_decode_batch)
_compiled: dict = {}

def compiled_decoder(metadata: np.ndarray) -> CompileResultWAP:
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
    if sig not in _compiled:
        decode_batch.compile(sig.args)
        _compiled[sig] = CompileResultWAP(decode_batch.overloads[sig.args])
    return _compiled[sig]

class ViewDecoder(Operation):
    """Decodes each image (and its companion) once; see `_decode_batch`. Its FFCV buffers per sample:
    images, temp (the fused decode), companion (the companion's index, written in Python), decoded (what was
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
            AllocationQuery((self.n_images, DECODED_FIELDS), i8),
            AllocationQuery((nv, 4), np.dtype("<i4")),
        ))

    def generate_code(self):  # noqa: ANN201
        n_images, V, fused = self.n_images, self.V, self.fused
        decode_batch, imdecode, resize = compiled_decoder(self.metadata), ctypes_imdecode, ctypes_resize
        memmove = ctypes.memmove

        def decode(batch_indices, storage, metadata, storage_state):  # noqa: ANN001, ANN202
            images, temp, companion, decoded, windows = storage
            decode_batch(imdecode, resize, memmove, batch_indices, companion, metadata, storage_state, windows,
                         images, temp, decoded, n_images, V, fused)
            return images[: len(batch_indices)]

        return decode

class IndexDecoder(IntDecoder):
    """An FFCV decoder over any scalar field that emits the batch's sample indices (the stock FFCV baseline's
    indices, `viewpipe.pipelines.baselines.StockFfcvLoader`)."""

    def generate_code(self):  # noqa: ANN202
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

    def __init__(self, owner) -> None:  # noqa: ANN001  (an FfcvLoader)
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
