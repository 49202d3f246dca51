"""Baselines that only `viewpipe bench` measures (never a training backend): a stock DALI two-view pipeline
over a converted dataset's WebDataset shards. (The PIL decode ceiling's `DecodeDataset` stays in
`viewpipe.pipelines.reference`.)

The stock pipeline is what a DALI self-supervised example does (solo-learn's and DALI's own SSL examples):
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

from viewpipe.augment import ViewAugment
from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import DatasetIndex, shard_paths
from viewpipe.pipelines import LoaderConfig

__all__ = ["StockDaliLoader", "stock_dali_loader"]


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

        cfg, aug = self.cfg, self.cfg.augment
        mean, std = [255.0 * m for m in aug.mean], [255.0 * s for s in aug.std]

        @dali.pipeline_def(batch_size=cfg.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch, seed=cfg.seed)
        def stock():  # noqa: ANN202
            jpegs, meta = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths, ext=["jpg;png", "meta"],
                dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
                random_shuffle=cfg.shuffle, name="Reader")
            if self.device_id is None:
                images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            else:
                images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB,
                                           hw_decoder_load=self.hw_decoder_load)
            groups, group = cfg.view_groups(), cfg.group_of_views()  # (multi-crop: each view its group's size)
            views = [_view(fn, types, images, aug.views[v % len(aug.views)], groups[group[v]].size,
                           groups[group[v]].scale, cfg.crop.ratio, cfg.group_augment(group[v]).kernel_size, mean, std)
                     for v in range(cfg.views)]
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
