"""The DALI backend: each image decoded once (nvJPEG on the GPU with `device="mixed"`, libjpeg-turbo on the
CPU with `device_id=None`), its V ContrastiveCrop views cut and resized inside DALI, the photometric
augmentations in torch on the views' device.

Data flow per batch (one `fn.external_source` callback in the main process, called by DALI up to
`prefetch` batches ahead of the consumer):

1. the batch's sample indices: a pure function of (seed, epoch, rank, world) — see `epoch_order`;
2. their encoded bytes, sliced out of the memory-mapped WebDataset tars with the offsets of `index.npz`;
3. the V crop windows per sample from the core sampler (`viewpipe.crop.view_windows`,
   vectorised over the batch), image sizes from the index, boxes read live from the SampleState;
4. in the graph: `fn.decoders.image` once, then one `fn.resize` per view with the window as an absolute
   ROI. DALI orders `roi_start`/`roi_end` like the tensor shape, so for HWC images they are (y, x).

A box update published with `SampleState.set_boxes` is used by every batch the consumer receives from the
`prefetch`-th batch after the update on (batches already requested by DALI keep the old boxes).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from viewpipe.augment import Augmenter
from viewpipe.crop import view_windows
from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import DatasetIndex, header_size, shard_paths
from viewpipe.pipelines import LoaderConfig, dist_rank_world, epoch_batches, epoch_order
from viewpipe.sources import Source
from viewpipe.state import SampleState

class _ShardReader:
    """Encoded images of a converted dataset, sliced out of its memory-mapped WebDataset tars."""

    def __init__(self, root: Path) -> None:
        self.index = index = DatasetIndex.load(root)
        if (index.shards < 0).any():
            raise ViewpipeError(f"{root}: the dataset has no DALI shards; convert it with --formats dali")
        self.labels = index.labels
        self._maps: dict[int, mmap.mmap] = {}
        for shard in np.unique(index.shards).tolist():
            tar, _ = shard_paths(root, shard)
            try:
                with open(tar, "rb") as f:
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise ViewpipeError(f"{tar}: cannot open shard ({exc.strerror}); re-run `viewpipe convert`") from None

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, k: int) -> np.ndarray:
        idx = self.index
        return np.frombuffer(self._maps[int(idx.shards[k])], dtype=np.uint8, count=int(idx.nbytes[k]),
                             offset=int(idx.offsets[k]))

    def sizes(self, indices: np.ndarray, data: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.index.heights[indices], self.index.widths[indices]], 1)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


class _SourceReader:
    """Encoded images of any `viewpipe.sources.Source` (an image folder, a .npz collection); image sizes
    (after EXIF orientation) from the headers, parsed the first time a sample is seen."""

    def __init__(self, source: Source) -> None:
        self.source, self.labels = source, np.asarray(source.labels, dtype=np.int64)
        self._sizes = np.full((len(source), 2), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, k: int) -> np.ndarray:
        return np.frombuffer(self.source.read(k), dtype=np.uint8)

    def sizes(self, indices: np.ndarray, data: list[np.ndarray]) -> np.ndarray:
        for k, d in zip(indices.tolist(), data):
            if self._sizes[k, 0] < 0:
                self._sizes[k] = header_size(d.tobytes(), self.source.describe(k))
        return self._sizes[indices]

    def close(self) -> None:
        pass


class _Callback:
    """The external-source callback: batch `i` of the current epoch → encoded images, windows, ROIs."""

    def __init__(self, reader: _ShardReader | _SourceReader, cfg: LoaderConfig, state: SampleState | None,
                 rank: int) -> None:
        self.reader, self.cfg, self.state, self.rank = reader, cfg, state, rank
        self.epoch = 0
        self.batches: list[np.ndarray] = []

    def windows(self, indices: np.ndarray, sizes: np.ndarray, batch: int) -> np.ndarray:
        """(B, V, 4) int32 windows (top, left, h, w): one `draw` of V·B windows, view-major (all samples'
        view 0, then view 1, ...), from `default_rng([seed, epoch, rank, batch])`."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.epoch, self.rank, batch])
        boxes = self.state.boxes(indices) if self.state is not None and cfg.crop.use_box else None
        return view_windows(rng, sizes, boxes, cfg.views, cfg.crop)

    def __call__(self, i: int) -> tuple:
        if i >= len(self.batches):
            raise StopIteration
        indices = self.batches[i]
        data = [self.reader.read(k) for k in indices.tolist()]
        win = self.windows(indices, self.reader.sizes(indices, data), i)
        out = [data, self.reader.labels[indices], indices, win]
        for v in range(self.cfg.views):
            start = win[:, v, 0:2].astype(np.float32)  # (y, x): DALI's ROI follows the HWC shape order
            out += [start, start + win[:, v, 2:4].astype(np.float32)]
        return tuple(out)


def _build_pipeline(source: _Callback, cfg: LoaderConfig, device_id: int | None, num_threads: int,
                    hw_decoder_load: float, prefetch: int):  # noqa: ANN202  (a DALI Pipeline)
    dali = import_optional("nvidia.dali", "dali", "NVIDIA DALI")
    from nvidia.dali import fn, types

    gpu = device_id is not None
    V, S = cfg.views, cfg.augment.size

    @dali.pipeline_def(batch_size=cfg.batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=prefetch, seed=cfg.seed)
    def views_pipeline():  # noqa: ANN202
        jpegs, labels, indices, windows, *rois = fn.external_source(
            source=source, num_outputs=4 + 2 * V, batch=True, parallel=False, cycle=None,
            dtype=[types.UINT8, types.INT64, types.INT64, types.INT32] + [types.FLOAT] * (2 * V))
        if gpu:
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        views = [fn.resize(images, size=[S, S], roi_start=rois[2 * v], roi_end=rois[2 * v + 1], roi_relative=False,
                           antialias=True, interp_type=types.INTERP_LINEAR) for v in range(V)]
        return (*views, labels, indices, windows)

    pipe = views_pipeline()
    pipe.build()
    return pipe


def _to_torch(tl, device: torch.device) -> torch.Tensor:  # noqa: ANN001  (a DALI TensorList)
    """A dense DALI batch as a torch tensor on `device` (copied: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor())).to(device)


class DaliLoader:
    """Iterable of batches `(views, labels, indices[, windows])`: V float tensors (B, 3, S, S), int64 labels
    and sample indices, and with `return_windows` the (B, V, 4) int32 crop windows used.

    One iterator at a time; starting a new one drains the batches an interrupted epoch had prefetched.
    `device_id="auto"`: the current CUDA device (nvJPEG via `device="mixed"`), or DALI's CPU-only mode
    (`device_id=None`) without CUDA. `rank`/`world` default to torch.distributed's when it is initialised.
    `prefetch`: DALI's queue depth, which is also the bound on how late a box update arrives."""

    def __init__(self, data: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, *, device_id: int | None | str = "auto",
                 hw_decoder_load: float = 0.65, rank: int | None = None, world: int | None = None,
                 return_windows: bool = False, prefetch: int = 2, num_threads: int | None = None) -> None:
        import_optional("nvidia.dali", "dali", "NVIDIA DALI")
        if isinstance(data, (str, os.PathLike)):
            self.reader: _ShardReader | _SourceReader = _ShardReader(Path(data))
        else:
            self.reader = _SourceReader(data)
        if state is not None and len(state) != len(self.reader):
            raise ViewpipeError(
                f"sample state {state.name!r} has {len(state)} rows but the data has {len(self.reader)} samples")
        if device_id == "auto":
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.device_id = device_id
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.rank, self.world = dist_rank_world(rank, world)
        self.cfg, self.state, self.return_windows = cfg, state, return_windows
        self.hw_decoder_load, self.prefetch = hw_decoder_load, prefetch
        self.num_threads = num_threads or max(1, cfg.workers)
        self.epoch = 0
        self._source = _Callback(self.reader, cfg, state, self.rank)
        self._augmenter = Augmenter(cfg.augment)
        self._pipe = None
        self._running = False  # the pipeline has an epoch in flight that must be drained before the next

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's sample order in `epoch` (default: the current one)."""
        return epoch_order(len(self.reader), self.cfg.seed, self.epoch if epoch is None else epoch,
                           self.cfg.shuffle, self.rank, self.world, self.cfg.drop_last)

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of sample indices in `epoch` (see `viewpipe.pipelines.epoch_batches`)."""
        return epoch_batches(len(self.reader), self.cfg, self.epoch if epoch is None else epoch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.batches())

    def _drain(self) -> None:
        """Finish an interrupted epoch (the prefetched batches) and rewind the pipeline."""
        if not self._running:
            return
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            pass
        self._pipe.reset()
        self._running = False

    def __iter__(self) -> Iterator[tuple]:
        if self._pipe is None:
            self._pipe = _build_pipeline(self._source, self.cfg, self.device_id, self.num_threads,
                                         self.hw_decoder_load, self.prefetch)
        else:
            self._drain()
        src = self._source
        src.epoch, src.batches = self.epoch, self.batches()
        if not src.batches:
            return
        self._running = True
        V = self.cfg.views
        # one torch Generator per batch, seeded from (seed, epoch, rank, batch): photometric draws are reproducible
        seeds = np.random.SeedSequence([self.cfg.seed, self.epoch, self.rank]).generate_state(
            len(src.batches), np.uint64)
        for b in range(len(src.batches)):
            try:
                out = self._pipe.run()
            except StopIteration:  # (not expected: the source ends exactly after the last batch)
                break
            labels = torch.from_numpy(np.array(out[V].as_tensor()).reshape(-1))
            indices = torch.from_numpy(np.array(out[V + 1].as_tensor()).reshape(-1))
            gen = torch.Generator().manual_seed(int(seeds[b]) & 0x7FFF_FFFF_FFFF_FFFF)
            views = [self._augmenter.finish(_to_torch(out[v], self.device).permute(0, 3, 1, 2).float().div_(255.0),
                                            v, gen).contiguous() for v in range(V)]
            batch = (views, labels, indices)
            if self.return_windows:
                batch += (torch.from_numpy(np.array(out[V + 2].as_tensor())),)
            yield batch
        # the source raises StopIteration on the next request: collect it so that reset() is valid
        self._drain()

    def close(self) -> None:
        self._pipe = None
        self.reader.close()


def dali_loader(data: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                state: SampleState | None = None, **kwargs) -> DaliLoader:  # noqa: ANN003
    """A DALI loader over a converted dataset folder (its WebDataset shards), or over any `Source` (an image
    folder or .npz collection, read file by file: for `viewpipe bench` and small data). See `DaliLoader`."""
    return DaliLoader(data, cfg, state, **kwargs)
