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

import os
import sys
from functools import cache, partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import BETON, INDEX
from viewpipe.pipelines import (Batch, EpochPosition, LoaderConfig, Planner, Substitutes, check_state,
                                ViewFinisher, dist_rank_world, resolve_overlap)
from viewpipe.state import SampleState



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
def _ffcv():  # noqa: ANN202  (the module viewpipe.pipelines.ffcv_ops)
    """This backend's FFCV classes and compiled decoder (`viewpipe.pipelines.ffcv_ops`), imported once per
    process on first use: ffcv is imported lazily, so `viewpipe.pipelines.ffcv` imports without it."""
    _import_ffcv()
    _quiet_stale_dispatcher_finalizers()
    from viewpipe.pipelines import ffcv_ops

    return ffcv_ops


def _beton(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    beton = p if p.suffix == ".beton" else p / BETON
    if not beton.is_file():
        if (p / INDEX).is_file():  # a dataset converted without the FFCV format
            raise ViewpipeError(f"{p}: converted without the FFCV format ({beton.name} is missing); convert its "
                                "source again into a new folder with --format ffcv (or both) and pass that folder")
        raise ViewpipeError(f"{p}: not an FFCV dataset; convert it first (viewpipe convert {p} DST --format ffcv) "
                            "and pass DST")
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
    `decodes` counts, per sample, the images the compiled decoder produced. One iterator at a time; starting a
    new one ends the previous one. `state_dict()` / `load_state_dict()` resume mid-epoch with the same
    batches, windows and augmentations."""

    def __init__(self, data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, *, device: str | torch.device = "auto", rank: int | None = None,
                 world: int | None = None, companions: bool = False,
                 fused: bool = False, batches_ahead: int = 2, num_threads: int | None = None,
                 overlap: bool | None = None) -> None:
        _import_ffcv()
        beton = _beton(data)
        ops = _ffcv()
        import numba
        from ffcv.fields import RGBImageField
        from ffcv.loader import Loader
        from ffcv.pipeline.graph import DecoderNode
        from ffcv.reader import Reader

        reader = Reader(str(beton))
        names = list(reader.handlers)
        if "image" not in names or not isinstance(reader.handlers["image"], RGBImageField) or "label" not in names:
            raise ViewpipeError(f"{beton}: expected the fields image (RGBImageField) and label, found {names}; "
                                "convert it with viewpipe convert")
        self.num_samples = int(reader.num_samples)
        check_state(state, self.num_samples, companions)
        meta = reader.metadata[f"f{names.index('image')}"]
        self._sizes = np.stack([meta["height"], meta["width"]], 1).astype(np.int64)  # (N, 2)
        self.max_size = (int(meta["height"].max()), int(meta["width"].max()))
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.rank, self.world = dist_rank_world(rank, world)
        self.cfg, self.state, self.companions = cfg, state, companions
        self.fused = fused
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

        if self.fused and len({g.size for g in cfg.view_groups()}) > 1:
            raise ViewpipeError("fused=True cuts every view to one size on FFCV's threads; multi-crop view groups of "
                                "several sizes need the default path (fused=False)")
        self._n_images = 2 if companions else 1
        pipelines, self._decoder = self._pipelines(ops)
        self._order = ops.EpochOrder(self)
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

    def _pipelines(self, ops) -> tuple[dict, object | None]:  # noqa: ANN001  (viewpipe.pipelines.ffcv_ops)
        """FFCV's pipelines (image: the compiled `ViewDecoder`; label) and the decoder whose buffers `_plan`
        fills (None: no buffers to fill)."""
        from ffcv.pipeline.pipeline_spec import PipelineSpec

        decoder = ops.ViewDecoder(self._n_images, self._decoded_views(), self.fused, self.cfg.view_groups()[0].size)
        return {"image": PipelineSpec("image", decoder=decoder),
                "label": PipelineSpec("label", decoder=ops.IntDecoder())}, decoder

    def _decoded_views(self) -> int:
        """The views `ViewDecoder` is made for (its windows buffer; with `fused`, the views it cuts)."""
        return self.cfg.views

    # ------------------------------------------------------------------ the producer side (FFCV's thread)
    def _plan(self, epoch: int, start: int):  # noqa: ANN202
        """What FFCV's thread calls right before decoding batch `start + b_ix`: the batch's plan (the shared
        `Planner`: windows from the live boxes, companions) into the decoder's buffers."""

        def prepare(b_ix: int, indices: np.ndarray, storage: tuple) -> None:
            _, _, companion, _, windows = storage
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

    def _views(self, images: np.ndarray, decoded: np.ndarray, windows: np.ndarray, gen: torch.Generator) -> list:
        """The batch's views from FFCV's decoded slot: uploaded, cut and resized (`Augmenter.forward`: Triton
        reading the uint8 slot on a GPU, roi_align on the CPU), then finished; view V + v like view v."""
        V = self.cfg.views
        x = self._to_device(images)
        if self.fused:  # (B, n_views, S, S, 3), cut and resized on FFCV's threads
            return [self._finisher.finish(x[:, v], v, gen, layout="hwc") for v in range(V * self._n_images)]
        Hp, Wp = self.max_size  # (B, n_images, Hmax, Wmax, 3)
        views = []
        for i in range(self._n_images):  # cut to the batch's largest image (+ the repeated row/column)
            h, w = min(Hp, int(decoded[:, i, 1].max()) + 1), min(Wp, int(decoded[:, i, 2].max()) + 1)
            views += self._finisher.crop_and_finish(x[:, i, :h, :w], windows[:, i * V : (i + 1) * V], gen, "hwc")
        return views

    def _record(self, decoded: np.ndarray) -> None:
        """Count decodes per sample."""
        for i in range(self._n_images):
            np.add.at(self.decodes, decoded[:, i, 0], decoded[:, i, 3])

    def _failures(self, result: tuple) -> dict[int, str]:
        """The samples of a decoded batch (FFCV's result) libjpeg-turbo reported an error or warning for
        (damaged data: their pixels may be incomplete), index → why."""
        decoded = result[-1][3]
        return {int(k): f"fails to decode (libjpeg-turbo status {int(status)}: damaged data)"
                for i in range(self._n_images) for k, status in decoded[np.flatnonzero(decoded[:, i, 4]), i][:, [0, 4]]}

    def __iter__(self) -> Iterator[tuple]:
        return self.hand_out(self.epoch, len(self.batches()), self._pending())

    def _pending(self) -> Iterator[tuple[int, Callable[[], tuple]]]:
        """(b, the function that makes batch b from FFCV's result) for the rest of the epoch. Each function
        runs before FFCV's next result is taken, while FFCV's thread keeps the slot it reads."""
        ops = _ffcv()
        epoch, b = self.epoch, self._next
        batches = [self.substitutes(x) for x in self.batches(epoch)]
        self._stop()
        mine = None
        try:
            if b < len(batches):
                self._epoch = mine = ops.Epoch(self._loader, batches[b:], self._node, self._plan(epoch, b))
            while b < len(batches):
                try:
                    result = next(mine)
                except StopIteration:
                    error = mine.error
                    raise (error if error is not None else RuntimeError("FFCV's epoch thread ended early")) from None
                failed = self._failures(result)
                if failed:  # replace them from now on and decode this batch again, from the new plan
                    self._stop()
                    self.substitutes.add(failed)
                    batches = [self.substitutes(x) for x in self.batches(epoch)]
                    self._epoch = mine = ops.Epoch(self._loader, batches[b:], self._node, self._plan(epoch, b))
                    continue
                yield b, partial(self._batch, result, batches[b], self._planner.seed(epoch, b))
                b += 1
        finally:
            if self._epoch is mine:  # (an abandoned iterator never stops a newer one)
                self._stop()

    def _decoded(self, result: tuple, expected: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, indices) of FFCV's result for one batch, checked against the `expected` samples; the
        decodes counted."""
        labels = torch.from_numpy(np.asarray(result[1]).reshape(-1).astype(np.int64))
        decoded = result[-1][3]
        indices = torch.from_numpy(decoded[:, 0, 0].copy())
        if not np.array_equal(indices.numpy(), expected):  # the decoder saw other samples: a bug
            raise RuntimeError(f"FFCV decoded samples {indices.tolist()}, expected {expected.tolist()}")
        self._record(decoded)
        return labels, indices

    def _batch(self, result: tuple, expected: np.ndarray, seed: int) -> Batch:
        """The `Batch` of FFCV's result for one batch."""
        labels, indices = self._decoded(result, expected)
        images, _, _, decoded, windows = result[-1]
        gen = torch.Generator().manual_seed(seed)
        neighbours = torch.from_numpy(decoded[:, 1, 0].copy()) if self.companions else None
        return Batch(self._views(images, decoded, windows, gen), labels, indices, neighbours,
                     torch.from_numpy(windows.copy()))

    def close(self) -> None:
        self._stop()


def ffcv_loader(data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                state: SampleState | None = None, **kwargs) -> FfcvLoader:  # noqa: ANN003
    """An FFCV loader over a converted dataset folder (its `data.beton`) or a .beton file. See `FfcvLoader`."""
    return FfcvLoader(data, cfg, state, **kwargs)

