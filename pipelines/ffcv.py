"""The FFCV backend: each JPEG of a converted `.beton` decoded once on FFCV's CPU threads by a compiled
decoder (`ffcv_ops.ViewDecoder`), the views cut, resized and augmented in torch on the views' device.

Per batch: the epoch's batches (`epoch_batches`) go to FFCV as a custom `TraversalOrder`; on FFCV's producer
thread, right before a batch is decoded, the shared `Planner` makes its plan from the live SampleState and
writes the windows and companions into the decoder's per-slot buffers (compiled code captures no table, so
it sees every update); the decoder fills a padded (Hmax, Wmax, 3) slot per image, its last row and column
repeated; the consumer uploads the slot and cuts every view from it (Triton on a GPU, roi_align on the CPU).
A state update published after the consumer received batch u is used from batch u + `prefetch` on,
`prefetch = batches_ahead + 2` (+ 1 with overlap): the queued batches, the one FFCV's thread may be
preparing and the one it starts when the consumer frees a place."""

from __future__ import annotations

import os
import sys
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import BETON, INDEX
from viewpipe.pipelines.base import Batch, Loader, Samples, register
from viewpipe.pipelines.config import LoaderConfig
from viewpipe.sources import Source



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
    threads = torch.get_num_threads()  # importing ffcv sets torch's threads to 1: keep the caller's
    try:
        import_optional("ffcv.loader", "ffcv", "FFCV")
    finally:
        torch.set_num_threads(threads)


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


@register("ffcv")
class FfcvLoader(Loader):
    """`Loader` over a converted dataset's `.beton` (its folder, the file, or the converted dataset's
    `Source`), decoded on `cfg.workers` FFCV threads (see the module). Under torch.distributed FFCV runs with
    `distributed=True` and this backend's order. `cfg.ffcv.batches_ahead`: FFCV's queue; `cfg.ffcv.fused`:
    crop and resize on FFCV's threads as FFCV's own decoders do (OpenCV INTER_AREA), only the photometric
    steps on the device. `decodes` counts, per sample, the images the compiled decoder produced."""

    reads = "ffcv"
    preferred_on = ("cpu",)

    def __init__(self, source: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                 state: Any = None, *, rank: int | None = None, world: int | None = None) -> None:
        super().__init__(source, cfg, state, rank=rank, world=world)
        import numba

        self.fused, self.batches_ahead = cfg.ffcv.fused, cfg.ffcv.batches_ahead
        self.num_threads = max(1, min(cfg.workers or 1, numba.config.NUMBA_NUM_THREADS))
        self.decodes = np.zeros(self.num_samples, np.int64)
        self._epoch = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        if self.fused and len({g.size for g in cfg.view_groups()}) > 1:
            raise ViewpipeError("ffcv.fused=True cuts every view to one size on FFCV's threads; multi-crop view groups of "
                                "several sizes need the default path (ffcv.fused=False)")
        self._n_images = 2 if self.companions else 1
        self._loader, self._node = self._ffcv_loader()

    def _ffcv_loader(self) -> tuple[Any, int | None]:
        """FFCV's `Loader` over the .beton with this backend's pipelines and order, and the graph node of the
        decoder whose buffers `_plan` fills (None: none)."""
        from ffcv.loader import Loader as FfcvDataLoader
        from ffcv.pipeline.graph import DecoderNode

        ops, cfg = _ffcv(), self.cfg
        pipelines, decoder = self._pipelines(ops)
        threads = torch.get_num_threads()  # FFCV sets torch's threads to its own count: keep the caller's
        try:
            loader = FfcvDataLoader(str(self.beton), batch_size=cfg.batch_size, num_workers=self.num_threads,
                                    os_cache=True, order=ops.EpochOrder(self), distributed=self.world > 1,
                                    seed=cfg.seed, pipelines=pipelines, drop_last=cfg.drop_last,
                                    batches_ahead=self.batches_ahead)
        finally:
            torch.set_num_threads(threads)
        node = next((n.id for n in loader.graph.nodes if isinstance(n, DecoderNode) and n.decoder is decoder), None)
        return loader, node if decoder is not None else None

    @classmethod
    def can_read(cls, source: str | os.PathLike[str] | Source) -> bool:
        """Whether `source` is (a converted dataset with) a .beton."""
        root = source if isinstance(source, (str, os.PathLike)) else getattr(source, "root", None)
        try:
            return root is not None and _beton(root).is_file()
        except ViewpipeError:
            return False

    def open(self, source: str | os.PathLike[str] | Source) -> Samples:
        _import_ffcv()
        from ffcv.fields import RGBImageField
        from ffcv.reader import Reader

        self.beton = beton = _beton(source if isinstance(source, (str, os.PathLike)) else source.root)
        reader = Reader(str(beton))
        names = list(reader.handlers)
        if "image" not in names or not isinstance(reader.handlers["image"], RGBImageField) or "label" not in names:
            raise ViewpipeError(f"{beton}: expected the fields image (RGBImageField) and label, found {names}; "
                                "convert it with viewpipe convert")
        meta = reader.metadata[f"f{names.index('image')}"]
        sizes = np.stack([meta["height"], meta["width"]], 1).astype(np.int64)  # (N, 2)
        self.max_size = (int(meta["height"].max()), int(meta["width"].max()))
        return Samples(int(reader.num_samples), lambda k: sizes[k], lambda k: f"{beton} (sample {k})")

    def planned_ahead(self) -> int:
        return self.cfg.ffcv.batches_ahead + 2

    @classmethod
    def baselines(cls) -> tuple[type[Loader], ...]:
        from viewpipe.pipelines.baselines import FfcvDecodeLoader, StockFfcvLoader

        return FfcvDecodeLoader, StockFfcvLoader

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
            plan = self.planner.plan(epoch, start + b_ix, indices)
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
            return [self.finisher.finish(x[:, v], v, gen, layout="hwc") for v in range(V * self._n_images)]
        Hp, Wp = self.max_size  # (B, n_images, Hmax, Wmax, 3)
        views = []
        for i in range(self._n_images):  # cut to the batch's largest image (+ the repeated row/column)
            h, w = min(Hp, int(decoded[:, i, 1].max()) + 1), min(Wp, int(decoded[:, i, 2].max()) + 1)
            views += self.finisher.crop_and_finish(x[:, i, :h, :w], windows[:, i * V : (i + 1) * V], gen, "hwc")
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

    def pending(self) -> Iterator[tuple[int, Callable[[], tuple]]]:
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
                yield b, partial(self._batch, result, batches[b], self.planner.seed(epoch, b))
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

