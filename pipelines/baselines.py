"""What only `viewpipe bench` measures, never a training backend: the loaders it times beside the production
backends (`viewpipe.pipelines.reference`, `.dali`, `.ffcv`), which carry no benchmark-only flag or branch.

- the decode ceilings: `DecodeDataset` (PIL, read and decode only), `DaliDecodeLoader` (DALI's decoder over the
  epoch's batches, `dali_decode_loader`) and `FfcvDecodeLoader` (the FFCV backend's compiled decoder without
  views, `ffcv_decode_loader`);
- `DaliCutLoader` (`dali_cut_loader`): the DALI backend's views as its graph cut them, without the photometric
  ops (where the time goes);
- the stock baselines: FFCV's own `RandomResizedCropRGBImageDecoder`, one decode per view (`stock_rrc_loader`,
  the FFCV-SSL way), and a stock DALI two-view pipeline over a converted dataset's WebDataset shards
  (`stock_dali_loader`).

The stock DALI pipeline is what a DALI self-supervised example does (solo-learn's and DALI's own SSL examples):
`fn.readers.webdataset`, one decode per image (nvJPEG with `device="mixed"` on a GPU, libjpeg-turbo in DALI's
CPU mode), then per view `fn.random_resized_crop`, `fn.color_twist` gated with its probability, a random
grayscale (`fn.hsv` with saturation 0), `fn.gaussian_blur` mixed in on a coin flip, a solarize lookup table
when the preset has one, and `fn.crop_mirror_normalize` with a random mirror. The whole view is made in
DALI's graph: no ContrastiveCrop boxes, no reproducible per-batch draws, and torchvision's semantics only
roughly (DALI's colour operators, all samples drawing each op's parameters). It is the speed to beat.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from viewpipe.augment import ViewAugment
from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import DatasetIndex, decode_rgb, shard_paths
from viewpipe.pipelines import Batch, LoaderConfig
from viewpipe.pipelines.dali import DaliLoader, _Callback, decode_graph
from viewpipe.pipelines.ffcv import FfcvLoader
from viewpipe.sources import Source
from viewpipe.state import SampleState

__all__ = ["DaliCutLoader", "DaliDecodeLoader", "DecodeDataset", "FfcvDecodeLoader", "StockDaliLoader",
           "StockFfcvLoader", "dali_cut_loader", "dali_decode_loader", "ffcv_decode_loader", "stock_dali_loader",
           "stock_rrc_loader"]


# ---------------------------------------------------------------------------- PIL: the decode ceiling
class DecodeDataset(Dataset):
    """Read and decode only (PIL, `decode_rgb`): the CPU decode ceiling `viewpipe bench` reports beside the
    loaders. Items are (height, width)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, int]:
        img = decode_rgb(self.source.read(index), self.source.describe(index))
        return img.height, img.width


# ---------------------------------------------------------------------------- DALI: decode only, views as cut
class _DecodeCallback(_Callback):
    """The DALI backend's external source without plans: each batch's usable samples' encoded images, labels
    and indices."""

    def __call__(self, i: int) -> tuple:
        b = self.start + i
        if b >= len(self.batches):
            raise StopIteration
        indices = self.planner.substitutes.usable(self.batches[b])
        return [self.reader.read(k) for k in indices.tolist()], self.reader.labels[indices], indices


class DaliDecodeLoader(DaliLoader):
    """The DALI backend's decode ceiling: the same batches as `DaliLoader` (same order, replacements, resume),
    decoded by the same decoder and nothing else; batches `(None, labels, indices)`."""

    def __init__(self, data: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, **kwargs) -> None:  # noqa: ANN003  (DaliLoader's keywords)
        super().__init__(data, cfg, state, **kwargs)
        self._source = _DecodeCallback(self.reader, self._source.planner)

    def _new_pipeline(self):  # noqa: ANN202  (a DALI Pipeline)
        dali = import_optional("nvidia.dali", "dali", "NVIDIA DALI")
        from nvidia.dali import fn, types

        decode = decode_graph(fn, types, self.device_id, self.hw_decoder_load)

        @dali.pipeline_def(batch_size=self.cfg.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.queue_depth, seed=self.cfg.seed)
        def decode_only():  # noqa: ANN202
            jpegs, labels, indices = fn.external_source(source=self._source, num_outputs=3, batch=True,
                                                        parallel=False, cycle=None,
                                                        dtype=[types.UINT8, types.INT64, types.INT64])
            return decode(jpegs), labels, indices

        pipe = decode_only()
        pipe.build()
        return pipe

    def _batch(self, out: tuple, seed: int) -> Batch:  # noqa: ARG002
        labels = torch.from_numpy(np.array(out[1].as_tensor()).reshape(-1))
        indices = torch.from_numpy(np.array(out[2].as_tensor()).reshape(-1))
        return Batch(None, labels, indices)


def dali_decode_loader(data: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                       **kwargs) -> DaliDecodeLoader:  # noqa: ANN003
    """The DALI decode ceiling over a converted dataset or any `Source` (see `DaliDecodeLoader`)."""
    return DaliDecodeLoader(data, cfg, None, **kwargs)


class _AsCut:
    """A view finisher that leaves the views as DALI's graph cut them (uint8 (B, S, S, 3))."""

    def finish(self, x: torch.Tensor, v: int, gen: torch.Generator, layout: str = "hwc") -> torch.Tensor:  # noqa: ARG002
        return x


class DaliCutLoader(DaliLoader):
    """`DaliLoader` without the photometric step: its views as the graph cut and resized them, uint8
    (B, S, S, 3) on the loader's device (what the graph alone costs)."""

    def __init__(self, data: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, **kwargs) -> None:  # noqa: ANN003  (DaliLoader's keywords)
        super().__init__(data, cfg, state, **kwargs)
        self._finisher = _AsCut()


def dali_cut_loader(data: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(),
                    state: SampleState | None = None, **kwargs) -> DaliCutLoader:  # noqa: ANN003
    """The DALI backend's views without photometric ops (see `DaliCutLoader`)."""
    return DaliCutLoader(data, cfg, state, **kwargs)


# ---------------------------------------------------------------------------- FFCV: decode only, stock decoder
class FfcvDecodeLoader(FfcvLoader):
    """The FFCV backend's decode ceiling: the same batches as `FfcvLoader`, each image decoded once by the
    same compiled decoder (counted in `decodes`, damaged ones replaced), no views; batches
    `(None, labels, indices)`."""

    def __init__(self, data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, **kwargs) -> None:  # noqa: ANN003  (FfcvLoader's keywords)
        super().__init__(data, cfg, state, **(kwargs | {"fused": False}))

    def _decoded_views(self) -> int:
        return 0  # no views

    def _plan(self, epoch: int, start: int):  # noqa: ANN202, ARG002
        return lambda b_ix, indices, storage: None  # no windows or companions to plan

    def _batch(self, result: tuple, expected: np.ndarray, seed: int) -> Batch:  # noqa: ARG002
        return Batch(None, *self._decoded(result, expected))


def ffcv_decode_loader(data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                       **kwargs) -> FfcvDecodeLoader:  # noqa: ANN003
    """The FFCV decode ceiling over a converted dataset folder or a .beton (see `FfcvDecodeLoader`)."""
    return FfcvDecodeLoader(data, cfg, None, **kwargs)


class StockFfcvLoader(FfcvLoader):
    """FFCV's stock RandomResizedCropRGBImageDecoder, one JPEG decode per view (the FFCV-SSL way: V image
    pipelines over the same field), the FFCV backend's order and photometric augmentation on the device;
    the sample indices from a pipeline over the label field. Batches `(views, labels, indices)`; no boxes,
    windows or companions (this decoder cannot see sample indices)."""

    def __init__(self, data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                 state: SampleState | None = None, **kwargs) -> None:  # noqa: ANN003, ARG002  (state is ignored)
        if kwargs.get("companions") or kwargs.get("fused"):
            raise ViewpipeError("the stock FFCV loader makes no companions or fused crops")
        super().__init__(data, cfg, None, **kwargs)

    def _pipelines(self, ops) -> tuple[dict, object | None]:  # noqa: ANN001
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.pipeline.pipeline_spec import PipelineSpec

        cfg, groups = self.cfg, self.cfg.view_groups()
        rrc = []
        for g in cfg.group_of_views():
            crop = cfg.group_crop(g)
            rrc.append(RandomResizedCropRGBImageDecoder((groups[g].size,) * 2, scale=crop.scale, ratio=crop.ratio))
        pipelines = {"image": PipelineSpec("image", decoder=rrc[0]),
                     "label": PipelineSpec("label", decoder=ops.IntDecoder())}
        pipelines |= {f"image_{v}": PipelineSpec("image", decoder=rrc[v]) for v in range(1, cfg.views)}
        pipelines["index"] = PipelineSpec("label", decoder=ops.IndexDecoder())
        return pipelines, None

    def _failures(self, result: tuple) -> dict[int, str]:  # noqa: ARG002
        return {}  # FFCV's own decoder reports no damaged data

    def _batch(self, result: tuple, expected: np.ndarray, seed: int) -> Batch:  # noqa: ARG002
        labels = torch.from_numpy(np.asarray(result[1]).reshape(-1).astype(np.int64))
        indices = torch.from_numpy(np.asarray(result[-2]).reshape(-1).astype(np.int64))
        gen = torch.Generator().manual_seed(seed)
        images = [result[0]] + list(result[2 : 2 + self.cfg.views - 1])
        views = [self._finisher.finish(self._to_device(x), v, gen, layout="hwc") for v, x in enumerate(images)]
        return Batch(views, labels, indices)


def stock_rrc_loader(data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                     state: SampleState | None = None, **kwargs) -> StockFfcvLoader:  # noqa: ANN003
    """FFCV's stock RandomResizedCropRGBImageDecoder, one decode per view: the benchmark's FFCV baseline (see
    `StockFfcvLoader`; the state is ignored)."""
    return StockFfcvLoader(data, cfg, state, **kwargs)


# ---------------------------------------------------------------------------- DALI: the stock two-view pipeline


def _mux(fn, condition, if_true, if_false):  # noqa: ANN001, ANN202  (DALI DataNodes)
    """`if_true` where the per-sample bool `condition` holds, else `if_false` (solo-learn's Mux: arithmetic,
    both branches computed for every sample, as DALI has no per-sample branch in a graph)."""
    return condition * if_true + (condition ^ True) * if_false


def _uniform(fn, lo: float, hi: float):  # noqa: ANN001, ANN202
    """A per-sample draw from U[lo, hi), or the constant where the range is empty (DALI refuses one)."""
    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def _view(fn, types, images, v: ViewAugment, size: int, scale: tuple[float, float],  # noqa: ANN001, ANN202
          ratio: tuple[float, float], kernel: int, mean: list[float], std: list[float]):
    """One view of the stock graph from the decoded images: crop, photometric ops, flip, normalise."""
    x = fn.random_resized_crop(images, size=[size, size], random_area=list(scale), random_aspect_ratio=list(ratio))
    b, c, s, h = v.jitter
    if v.jitter_p > 0 and any(v.jitter):
        on = fn.random.coin_flip(probability=v.jitter_p)  # identity parameters where the jitter is off
        off = 1 - on

        def factor(identity: float, lo: float, hi: float):  # noqa: ANN202
            return on * _uniform(fn, lo, hi) + off * identity

        x = fn.color_twist(x, brightness=factor(1.0, max(0.0, 1 - b), 1 + b),
                           contrast=factor(1.0, max(0.0, 1 - c), 1 + c),
                           saturation=factor(1.0, max(0.0, 1 - s), 1 + s),
                           hue=factor(0.0, -360.0 * h, 360.0 * h))  # DALI's hue is in degrees
    if v.grayscale > 0:
        x = fn.hsv(x, saturation=1.0 - fn.cast(fn.random.coin_flip(probability=v.grayscale), dtype=types.FLOAT))
    if v.blur > 0:
        blurred = fn.gaussian_blur(x, sigma=_uniform(fn, *v.blur_sigma), window_size=kernel)
        x = _mux(fn, fn.cast(fn.random.coin_flip(probability=v.blur), dtype=types.BOOL), blurred, x)
    if v.solarize > 0:
        t = round(255 * v.solarize_threshold)
        solar = fn.lookup_table(x, keys=list(range(256)), values=[255 - k if k >= t else k for k in range(256)],
                                dtype=types.UINT8)
        x = _mux(fn, fn.cast(fn.random.coin_flip(probability=v.solarize), dtype=types.BOOL), solar, x)
    return fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=v.flip), mean=mean, std=std,
                                    output_layout="CHW", dtype=types.FLOAT)


def _to_torch(tl, device: torch.device) -> torch.Tensor:  # noqa: ANN001  (a DALI TensorList)
    """A dense DALI batch as a torch tensor on `device` (copied: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))


class StockDaliLoader:
    """Iterable of batches `(views, labels)`: V float views (B, 3, S, S) normalised on the loader's device
    and int64 labels, from a stock DALI graph over `data`'s WebDataset shards (see the module). Each
    iteration yields one epoch's worth of full batches (epoch size // B); the reader runs on across epochs.

    `device_id="auto"`: the current CUDA device (decode `device="mixed"`, `hw_decoder_load` of the images
    to the hardware JPEG decoder where there is one), else DALI's CPU mode (`device_id=None`)."""

    def __init__(self, data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(), *,
                 device_id: int | None | str = "auto", hw_decoder_load: float = 0.65, prefetch: int = 2,
                 num_threads: int | None = None) -> None:
        import_optional("nvidia.dali", "dali", "NVIDIA DALI")
        index = DatasetIndex.load(data)
        if (index.shards < 0).any():
            raise ViewpipeError(f"{data}: the dataset has no DALI shards; convert it with --format dali (or both)")
        shards = [shard_paths(data, int(s)) for s in np.unique(index.shards)]
        self.paths, self.index_paths = [str(t) for t, _ in shards], [str(i) for _, i in shards]
        if device_id == "auto":
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.device_id = device_id
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.cfg, self.hw_decoder_load, self.prefetch = cfg, hw_decoder_load, prefetch
        self.num_threads = num_threads or max(1, cfg.workers)
        self.num_samples = len(index)
        self._pipe = None

    def _build(self):  # noqa: ANN202  (a DALI Pipeline)
        """The graph: read, decode once, V views (see the module)."""
        dali = import_optional("nvidia.dali", "dali", "NVIDIA DALI")
        from nvidia.dali import fn, types

        cfg = self.cfg
        decode = decode_graph(fn, types, self.device_id, self.hw_decoder_load)

        @dali.pipeline_def(batch_size=cfg.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch, seed=cfg.seed)
        def stock():  # noqa: ANN202
            jpegs, meta = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths, ext=["jpg;png", "meta"],
                dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
                random_shuffle=cfg.shuffle, name="Reader")
            images = decode(jpegs)
            views = []
            for v, g in enumerate(cfg.group_of_views()):  # each view with its group's crop and augmentation
                crop, aug = cfg.group_crop(g), cfg.group_augment(g)
                mean, std = [255.0 * m for m in aug.mean], [255.0 * s for s in aug.std]
                views.append(_view(fn, types, images, aug.views[v % len(aug.views)], aug.size, crop.scale,
                                   crop.ratio, aug.kernel_size, mean, std))
            return (*views, meta)

        pipe = stock()
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if self._pipe is None:
            self._pipe = self._build()
        V = self.cfg.views
        for _ in range(self.num_samples // self.cfg.batch_size):
            out = self._pipe.run()
            views = [_to_torch(out[v], self.device) for v in range(V)]
            meta = np.array(out[V].as_tensor()).reshape(-1, 2)  # .meta: (sample index, label) int64
            yield views, torch.from_numpy(meta[:, 1].copy())

    def close(self) -> None:
        self._pipe = None


def stock_dali_loader(data: str | os.PathLike[str], cfg: LoaderConfig = LoaderConfig(),
                      **kwargs) -> StockDaliLoader:  # noqa: ANN003
    """The stock DALI two-view pipeline over a converted dataset folder: `viewpipe bench`'s DALI baseline."""
    return StockDaliLoader(data, cfg, **kwargs)
