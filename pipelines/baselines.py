"""The loaders only `viewpipe bench` times beside the backends (each backend names its own in `baselines()`),
all `Loader` subclasses: the DALI and FFCV decode ceilings (the backend's decoder over the same batches,
nothing else), the DALI backend's views as its graph cut them (no photometric ops: where the time goes),
FFCV's stock `RandomResizedCropRGBImageDecoder` with one decode per view (the FFCV-SSL way), and a stock DALI
two-view pipeline as DALI's and solo-learn's SSL examples write it (`fn.readers.webdataset`, one decode,
per view `random_resized_crop`, `color_twist`, grayscale, `gaussian_blur` on a coin flip, solarize,
`crop_mirror_normalize`): no boxes, no reproducible draws, torchvision's semantics only roughly; the same
pipeline as a DALI expert writes it (`ExpertDaliLoader`: conditionals, so each op runs on its drawn samples
only, fp16 output, seeded draws); and the PIL decode ceiling (`PilDecodeLoader`), which `viewpipe bench`
times first whatever the backends."""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from viewpipe.augment import ViewAugment
from viewpipe.cuda_builds import import_dali
from viewpipe.errors import ViewpipeError
from viewpipe.formats import DatasetIndex, decode_rgb, shard_paths
from viewpipe.pipelines.base import Batch, Loader, Samples
from viewpipe.pipelines.config import LoaderConfig
from viewpipe.pipelines.dali import DaliLoader, _Callback, _to_torch, decode_graph
from viewpipe.pipelines.ffcv import FfcvLoader
from viewpipe.pipelines.plan import BatchPlan
from viewpipe.pipelines.reference import ReferenceBatches, ReferenceLoader, Unusable
from viewpipe.sources import Source

STOCK_DALI = "stock DALI"  # how the stock DALI pipeline's bench row starts
PIL_DECODE = "decode only (PIL, ceiling)"  # the PIL decode ceiling's bench row


# ---------------------------------------------------------------------------- PIL: the decode ceiling
class _DecodeBatches(ReferenceBatches):
    """A planned batch read and decoded by PIL (`decode_rgb`), nothing else: `Batch(None, labels, indices)`,
    or `Unusable` naming the first file that cannot be read or decoded."""

    def __getitem__(self, plan: BatchPlan) -> Batch | Unusable:
        for k in plan.indices.tolist():
            try:
                decode_rgb(self.source.read(k), self.source.describe(k))
            except ViewpipeError as exc:
                return Unusable({k: str(exc)})
        return Batch(None, torch.from_numpy(self.labels[plan.indices]), torch.from_numpy(plan.indices))


class PilDecodeLoader(ReferenceLoader):
    """The CPU decode ceiling: the reference loader's batches, workers and order, each image read and decoded
    by PIL and nothing else. It cuts no crops (its plans' windows are unused, so no header is parsed for
    them), and a file that cannot be read or decoded is an error naming it: a ceiling is of the data as is."""

    def open(self, source: Any) -> Samples:
        samples = super().open(source)
        return Samples(samples.count, lambda k: np.ones((len(k), 2), np.int64), samples.describe)

    def make_dataset(self) -> Dataset:
        return _DecodeBatches(self.source, self.cfg)

    def replace_unusable(self, unusable: dict[int, str]) -> None:
        raise ViewpipeError(next(iter(unusable.values())))

    def bench_row(self) -> tuple[str, int]:
        return PIL_DECODE, 1


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
    decoded by the same decoder and nothing else; batches `Batch(None, labels, indices)`."""

    def make_callback(self) -> _Callback:
        return _DecodeCallback(self.reader, self.planner)

    def bench_row(self) -> tuple[str, int]:
        return f"{self.name}, decode only ({'nvJPEG' if self.device_id is not None else 'CPU'}, ceiling)", 1

    def _new_pipeline(self):  # noqa: ANN202  (a DALI Pipeline)
        dali = import_dali(gpu=self.device_id is not None)
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


class _AsCut:
    """A view finisher that leaves the views as DALI's graph cut them (uint8 (B, S, S, 3))."""

    def finish(self, x: torch.Tensor, v: int, gen: torch.Generator, layout: str = "hwc") -> torch.Tensor:  # noqa: ARG002
        return x


class DaliCutLoader(DaliLoader):
    """`DaliLoader` without the photometric step: its views as the graph cut and resized them, uint8
    (B, S, S, 3) on the loader's device (what the graph alone costs)."""

    def __init__(self, source: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(), state: Any = None,
                 *, rank: int | None = None, world: int | None = None) -> None:
        super().__init__(source, cfg, state, rank=rank, world=world)
        self.finisher = _AsCut()

    def bench_row(self) -> tuple[str, int]:
        return f"{self.name}, {self.cfg.views} views, boxes, no photometric ops", self.cfg.views


# ---------------------------------------------------------------------------- FFCV: decode only, stock decoder
class FfcvDecodeLoader(FfcvLoader):
    """The FFCV backend's decode ceiling: the same batches as `FfcvLoader`, each image decoded once by the
    same compiled decoder (counted in `decodes`, damaged ones replaced), no views; batches
    `Batch(None, labels, indices)`."""

    def __init__(self, source: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(), state: Any = None,
                 *, rank: int | None = None, world: int | None = None) -> None:
        super().__init__(source, replace(cfg, ffcv=replace(cfg.ffcv, fused=False)), state, rank=rank, world=world)

    def bench_row(self) -> tuple[str, int]:
        return f"{self.name}, decode only (CPU threads, ceiling)", 1

    def _decoded_views(self) -> int:
        return 0  # no views

    def _plan(self, epoch: int, start: int):  # noqa: ANN202, ARG002
        return lambda b_ix, indices, storage: None  # no windows or companions to plan

    def _batch(self, result: tuple, expected: np.ndarray, seed: int) -> Batch:  # noqa: ARG002
        return Batch(None, *self._decoded(result, expected))


class StockFfcvLoader(FfcvLoader):
    """FFCV's stock RandomResizedCropRGBImageDecoder, one JPEG decode per view (the FFCV-SSL way: V image
    pipelines over the same field), the FFCV backend's order and photometric augmentation on the device;
    the sample indices from a pipeline over the label field. Batches `Batch(views, labels, indices)`; no
    boxes, windows or companions (this decoder cannot see sample indices)."""

    def __init__(self, source: str | os.PathLike[str] | Source, cfg: LoaderConfig = LoaderConfig(), state: Any = None,
                 *, rank: int | None = None, world: int | None = None) -> None:  # noqa: ARG002  (state is ignored)
        if cfg.companions or cfg.ffcv.fused:
            raise ViewpipeError("the stock FFCV loader makes no companions or fused crops")
        super().__init__(source, cfg, None, rank=rank, world=world)

    def bench_row(self) -> tuple[str, int]:
        return f"{self.name} stock RandomResizedCrop, {self.cfg.views} decodes per image", self.cfg.views

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
        views = [self.finisher.finish(self._to_device(x), v, gen, layout="hwc") for v, x in enumerate(images)]
        return Batch(views, labels, indices)


# ---------------------------------------------------------------------------- DALI: the stock two-view pipeline


def _mux(fn, condition, if_true, if_false):  # noqa: ANN001, ANN202  (DALI DataNodes)
    """`if_true` where the per-sample bool `condition` holds, else `if_false` (solo-learn's Mux: arithmetic,
    both branches computed for every sample, as DALI has no per-sample branch in a graph)."""
    return condition * if_true + (condition ^ True) * if_false


def _uniform(fn, lo: float, hi: float, **seed: int):  # noqa: ANN001, ANN202
    """A per-sample draw from U[lo, hi), or the constant where the range is empty (DALI refuses one)."""
    return fn.random.uniform(range=[lo, hi], **seed) if hi > lo else float(lo)


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


class StockDaliLoader(Loader):
    """Batches `Batch(views, labels, indices)`: V float views (B, 3, S, S) normalised on the loader's device,
    from a stock DALI graph over a converted dataset's WebDataset shards (see the module). Each epoch is
    (epoch size // B) full batches of DALI's own reader, which runs on across epochs: the state, the order
    and resume are not this pipeline's (it is the speed to beat). `cfg.device` and `cfg.dali` as `DaliLoader`."""

    reads = "dali"
    conditionals = False  # the graph's `if`s on DataNodes (DALI's `enable_conditionals`)

    def open(self, source: str | os.PathLike[str] | Source) -> Samples:
        import_dali()
        root = source if isinstance(source, (str, os.PathLike)) else source.root
        index = DatasetIndex.load(root)
        if (index.shards < 0).any():
            raise ViewpipeError(f"{root}: the dataset has no DALI shards; convert it with --format dali (or both)")
        shards = [shard_paths(root, int(s)) for s in np.unique(index.shards)]
        self.paths, self.index_paths = [str(t) for t, _ in shards], [str(i) for _, i in shards]
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.hw_decoder_load, self.num_threads = self.cfg.dali.hw_decoder_load, max(1, self.cfg.workers)
        self._pipe = None
        sizes = np.stack([index.heights, index.widths], 1).astype(np.int64)
        return Samples(len(index), lambda k: sizes[k], lambda k: f"{root} (sample {k})")

    def planned_ahead(self) -> int:
        return self.cfg.dali.prefetch_queue_depth

    def bench_row(self) -> tuple[str, int]:
        return f"{STOCK_DALI}, {self.cfg.views} views (RRC + DALI colour ops)", self.cfg.views

    def view_graph(self, fn, types, images, v: ViewAugment, size: int,  # noqa: ANN001, ANN201  (DALI DataNodes)
                   scale: tuple[float, float], ratio: tuple[float, float], kernel: int, mean: list[float],
                   std: list[float], view: int):
        """View `view` of the graph from the decoded images (`_view`: every op on every sample, then muxed)."""
        return _view(fn, types, images, v, size, scale, ratio, kernel, mean, std)

    def _build(self):  # noqa: ANN202  (a DALI Pipeline)
        """The graph: read, decode once, V views (see the module)."""
        dali = import_dali(gpu=self.device_id is not None)
        from nvidia.dali import fn, types

        cfg = self.cfg
        decode = decode_graph(fn, types, self.device_id, self.hw_decoder_load)

        @dali.pipeline_def(batch_size=cfg.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=cfg.dali.prefetch_queue_depth, seed=cfg.seed,
                           enable_conditionals=self.conditionals)
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
                views.append(self.view_graph(fn, types, images, aug.views[v % len(aug.views)], aug.size, crop.scale,
                                             crop.ratio, aug.kernel_size, mean, std, v))
            return (*views, meta)

        pipe = stock()
        pipe.build()
        return pipe

    def pending(self) -> Iterator[tuple[int, Callable[[], Batch]]]:
        if self._pipe is None:
            self._pipe = self._build()
        for b in range(self._next, len(self.batches())):
            yield b, partial(self._batch, self._pipe.run())

    def _batch(self, out: tuple) -> Batch:
        V = self.cfg.views
        views = [self.as_nchw(_to_torch(out[v], self.device)) for v in range(V)]
        meta = np.array(out[V].as_tensor()).reshape(-1, 2)  # .meta: (sample index, label) int64
        return Batch(views, torch.from_numpy(meta[:, 1].copy()), torch.from_numpy(meta[:, 0].copy()))

    def as_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of views as the graph gave it, as (B, 3, S, S) (this graph's are CHW already)."""
        return x

    def close(self) -> None:
        self._pipe = None


# ---------------------------------------------------------------------------- DALI: the expert stock pipeline
EXPERT_OPS = ("crop", "jitter?", "brightness", "contrast", "saturation", "hue", "grayscale?", "blur?", "sigma",
              "solarize?", "flip")  # each random op of an expert view, in the order of its seed


def _op_seed(seed: int, view: int, op: str) -> int:
    """The explicit DALI seed of one random op of one view: fixed by the loader's seed alone, so a view's crop
    and coin flips do not move when another op is switched off (and the graph loses an operator)."""
    return int(np.random.SeedSequence([seed, view, EXPERT_OPS.index(op)]).generate_state(1)[0] & 0x7FFFFFFF)


def _expert_view(fn, types, images, v: ViewAugment, size: int, scale: tuple[float, float],  # noqa: ANN001, ANN202
                 ratio: tuple[float, float], kernel: int, mean: list[float], std: list[float],
                 seed: Callable[[str], int], layout: str):
    """One view as DALI's documentation writes it (`enable_conditionals=True`): each photometric op inside an
    `if` on its own per-sample coin flip, so that DALI splits the batch and runs the op on the drawn samples
    only; grayscale by `color_space_conversion` to GRAY and back to 3 channels (ITU-R BT.601, torchvision's);
    crop, flip and normalise to fp16 `layout` in one `crop_mirror_normalize`. `seed(op)`: each op's seed."""
    x = fn.random_resized_crop(images, size=[size, size], random_area=list(scale), random_aspect_ratio=list(ratio),
                               seed=seed("crop"))
    b, c, s, h = v.jitter
    if v.jitter_p > 0 and any(v.jitter):
        if fn.random.coin_flip(probability=v.jitter_p, dtype=types.BOOL, seed=seed("jitter?")):
            x = fn.color_twist(x, brightness=_uniform(fn, max(0.0, 1 - b), 1 + b, seed=seed("brightness")),
                               contrast=_uniform(fn, max(0.0, 1 - c), 1 + c, seed=seed("contrast")),
                               saturation=_uniform(fn, max(0.0, 1 - s), 1 + s, seed=seed("saturation")),
                               hue=_uniform(fn, -360.0 * h, 360.0 * h, seed=seed("hue")))  # degrees
    if v.grayscale > 0:
        if fn.random.coin_flip(probability=v.grayscale, dtype=types.BOOL, seed=seed("grayscale?")):
            gray = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
            x = fn.cat(gray, gray, gray, axis=2)
    if v.blur > 0:
        if fn.random.coin_flip(probability=v.blur, dtype=types.BOOL, seed=seed("blur?")):
            x = fn.gaussian_blur(x, sigma=_uniform(fn, *v.blur_sigma, seed=seed("sigma")), window_size=kernel)
    if v.solarize > 0:
        if fn.random.coin_flip(probability=v.solarize, dtype=types.BOOL, seed=seed("solarize?")):
            t = round(255 * v.solarize_threshold)
            x = fn.lookup_table(x, keys=list(range(256)), values=[255 - k if k >= t else k for k in range(256)],
                                dtype=types.UINT8)
    return fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=v.flip, seed=seed("flip")),
                                    mean=mean, std=std, output_layout=layout, dtype=types.FLOAT16)


class ExpertDaliLoader(StockDaliLoader):
    """The stock DALI pipeline as a DALI expert writes it (issue 24): the same reader, decode and crops as
    `StockDaliLoader`, but blur, grayscale, solarize and the colour jitter run only on the samples whose coin
    flip drew them (DALI conditionals), and the views leave `crop_mirror_normalize` as fp16 (DALI has no
    bf16 output type; under the trainer's bf16 autocast the first layer casts them), (B, 3, S, S): contiguous
    NCHW ("CHW" from DALI), or with `cfg.channels_last` DALI's "HWC" seen as NCHW in channels_last memory (no
    copy). Every random op has an explicit seed from `cfg.seed`, the view and the op (`_op_seed`)."""

    conditionals = True

    def bench_row(self) -> tuple[str, int]:
        return f"{STOCK_DALI}, {self.cfg.views} views, expert (conditionals, fp16)", self.cfg.views

    def view_graph(self, fn, types, images, v: ViewAugment, size: int,  # noqa: ANN001, ANN201  (DALI DataNodes)
                   scale: tuple[float, float], ratio: tuple[float, float], kernel: int, mean: list[float],
                   std: list[float], view: int):
        """View `view` of the graph (`_expert_view`), its ops seeded from `cfg.seed` and `view`."""
        return _expert_view(fn, types, images, v, size, scale, ratio, kernel, mean, std,
                            partial(_op_seed, self.cfg.seed, view), "HWC" if self.cfg.channels_last else "CHW")

    def as_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.cfg.channels_last else x
