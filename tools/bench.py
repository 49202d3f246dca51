"""`viewpipe bench`: images/s and views/s of each backend beside the decode-only ceiling, in one run,
so the ratios hold on a noisy machine; for DALI also where the time goes (its graph without the photometric
ops, the augmenter alone on device-resident views) and a stock DALI two-view pipeline to compare against.
Speed is judged here, never in tests."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from viewpipe.errors import ViewpipeError
from viewpipe.formats import BETON, INDEX, DatasetIndex

if TYPE_CHECKING:  # (torch, and the modules that import it, are imported where they are used: `viewpipe bench
    # --help` stays fast)
    from viewpipe.pipelines import LoaderConfig
    from viewpipe.sources import Source



@dataclass
class BenchRow:
    name: str
    images: int
    seconds: float
    views: int
    reference: bool = False  # the reference loader's row (the table's "× reference" column)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def views_per_s(self) -> float:
        return self.images * self.views / self.seconds


def machine() -> str:
    """One line naming the CPU (and GPU) this ran on."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def generated_data(n: int = 1024) -> Path:
    """The default benchmark data: generated JPEGs of varied sizes, made once and cached."""
    cache = Path(os.environ.get("VIEWPIPE_CACHE", Path.home() / ".cache" / "viewpipe"))
    from viewpipe.synthetic import make_folder

    root = cache / f"synthetic-v1-{n}"
    if not root.exists():  # made under a temporary name and renamed: a folder there is complete
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".synthetic-"))
        make_folder(tmp, n=n, progress=True)
        try:
            tmp.rename(root)
        except OSError:  # another run made it meanwhile
            shutil.rmtree(tmp)
    return root


def converted_data(data: Path, split: str, formats: set[str], workers: int) -> Path:
    """`data` itself when it is a converted dataset, else a converted copy made once with `viewpipe convert`
    and cached (the converted backends read shards and .beton files, never the folder)."""
    from viewpipe.convert import convert

    if (data / INDEX).is_file():  # only the formats of the backends asked for are needed
        if "ffcv" in formats and not (data / BETON).is_file():
            raise ViewpipeError(f"{data}: no {BETON}; convert it with --format both to bench the ffcv backend")
        if "dali" in formats and not has_shards(data):
            raise ViewpipeError(f"{data}: no DALI shards; convert it with --format both to bench the dali backend")
        return data
    cache = Path(os.environ.get("VIEWPIPE_CACHE", Path.home() / ".cache" / "viewpipe"))
    key = hashlib.sha1(f"{data.resolve()}|{split}".encode()).hexdigest()[:12]
    dst = cache / "converted" / f"{data.stem}-{split}-{'+'.join(sorted(formats))}-{key}"
    convert(data, dst, formats=("dali", "ffcv") if "ffcv" in formats else ("dali",), workers=workers, split=split,
            resume=dst.exists())
    return dst


def has_shards(data: Path) -> bool:
    """Whether the converted dataset `data` has DALI shards (a dataset converted with `--format ffcv` alone has not)."""
    return bool((DatasetIndex.load(data).shards >= 0).all())


def formats_read(backends: list[str]) -> set[str]:
    """The converted formats the `backends` read (`Loader.reads`)."""
    from viewpipe.pipelines import get_backend

    return {get_backend(b).reads for b in backends} - {None}


def time_batches(loader: Iterable, batches: int, views: int, name: str, count: Callable[[Any], int]) -> BenchRow:
    """Time `batches` batches after one warm-up batch (worker start-up), cycling epochs if needed;
    `count(batch)` is the number of images in a batch. The loader is closed after (its threads and workers
    do not compete with the next row's)."""
    import torch
    from tqdm import tqdm

    it = iter(loader)
    try:
        next(it)
        images, t0 = 0, time.perf_counter()
        for _ in tqdm(range(batches), desc=name, unit="batch", leave=False, disable=None):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            images += count(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU augmentations of the last batches are done too
        seconds = time.perf_counter() - t0
    finally:
        getattr(it, "close", lambda: None)()
        getattr(loader, "close", lambda: None)()
    return BenchRow(name, images, seconds, views)


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) float32 boxes of 20-50% of each side at random places: what the benchmarks crop around."""
    lo = rng.uniform(0.0, 0.5, size=(n, 2))
    return np.concatenate([lo, lo + rng.uniform(0.2, 0.5, size=(n, 2))], 1).astype(np.float32)


def check(n: int, cfg: LoaderConfig, batches: int) -> None:
    """Refuse a run of `n` images that cannot time anything (before any conversion is made for it)."""
    if batches < 1:
        raise ViewpipeError(f"--batches must be at least 1, got {batches}")
    if n < 2 * cfg.batch_size:
        raise ViewpipeError(f"the data has {n} images, fewer than two batches of {cfg.batch_size}; lower --batch-size")


def augmenter_rows(cfg: LoaderConfig, batches: int, notes: list[str]) -> list[BenchRow]:
    """The augmenter alone (`Augmenter.finish` of every view) on device-resident uint8 views (B, S, S, 3),
    per implementation: torch, and the fused kernels where there is a GPU. What the loaders' photometric
    step costs without any loading."""
    import torch

    from viewpipe.pipelines.finish import ViewFinisher

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    B, V = cfg.batch_size, cfg.views
    g = torch.Generator(device=dev).manual_seed(0)
    x = [torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, device=dev, generator=g) for S in cfg.view_sizes()]
    rows = []
    for impl in ("torch", "fused"):
        if impl == "fused" and not gpu:
            notes.append("augmenter alone (fused): omitted (its Triton kernels need a GPU)")
            continue
        finisher = ViewFinisher(replace(cfg, augment_impl=impl))

        def steps(finisher: ViewFinisher = finisher) -> Iterable[None]:
            for i in itertools.count():
                for v in range(V):
                    finisher.finish(x[v], v, torch.Generator().manual_seed(i), layout="hwc")
                yield None

        rows.append(time_batches(steps(), batches, V, f"augmenter alone ({impl}, {dev.type}), {V} views",
                                 lambda _: B))
    return rows


def run(source: Source | None, backends: list[str], cfg: LoaderConfig, batches: int, seed: int = 0,
        converted: Path | None = None, notes: list[str] | None = None) -> list[BenchRow]:
    """The PIL decode ceiling, then per backend the benchmark-only loaders it names (`Loader.baselines`:
    its decode ceiling, stock pipelines) and its loader with boxes and without (plain RandomResizedCrop),
    then the augmenter alone. Backends that read a converted format (`Loader.reads`) read `converted`, the
    others and the PIL ceiling `source` (None: a converted dataset without DALI shards; no PIL row). Rows
    that cannot run here are left out with a line appended to `notes`."""
    from viewpipe.pipelines import get_backend
    from viewpipe.pipelines.baselines import PIL_DECODE, PilDecodeLoader
    from viewpipe.state import SampleState

    notes = [] if notes is None else notes
    classes = {name: get_backend(name) for name in backends}
    if converted is None and any(c.reads for c in classes.values()):
        raise ViewpipeError(f"backends {', '.join(b for b, c in classes.items() if c.reads)} need a converted dataset")
    if source is None and any(not c.reads for c in classes.values()):
        raise ViewpipeError(f"backends {', '.join(b for b, c in classes.items() if not c.reads)} need a source")
    n = len(source) if source is not None else len(DatasetIndex.load(converted))
    check(n, cfg, batches)
    rows = []
    if source is not None:
        rows.append(time_loader(PilDecodeLoader(source, cfg), batches))
    else:
        notes.append(f"{PIL_DECODE}: omitted ({converted} has no DALI shards for PIL to read)")
    boxes, plain = (replace(cfg, crop=replace(cfg.crop, use_box=use_box)) for use_box in (True, False))
    with SampleState.create(n) as state:
        state.set_boxes(random_boxes(np.random.default_rng(seed), n))
        for cls in classes.values():
            data = converted if cls.reads else source
            for loader_class, c in [(b, boxes) for b in cls.baselines()] + [(cls, boxes), (cls, plain)]:
                rows.append(time_loader(loader_class(data, c, state), batches, reference=cls.is_reference))
    # the augmenter alone, where a backend augments with it (all but the reference, which uses torchvision)
    return rows + (augmenter_rows(cfg, batches, notes) if any(not c.is_reference for c in classes.values()) else [])


def time_loader(loader: Any, batches: int, reference: bool = False) -> BenchRow:
    """`time_batches` of a `Loader`, named and counted as the loader says (`Loader.bench_row`); `reference`:
    the row the table's "× reference" column divides by."""
    name, views = loader.bench_row()
    return replace(time_batches(loader, batches, views, name, lambda b: len(b.indices)), reference=reference)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure loader throughput beside the decode ceiling",
                       description=__doc__)
    p.add_argument("--data", help="image folder, .npz JPEG collection or converted dataset (default: generated images); "
                   "the dali and ffcv backends read a converted copy, made once and cached")
    p.add_argument("--split", default="train", help="split of a .npz collection (default: train)")
    p.add_argument("--make-data", metavar="DIR", help="first write --make-count JPEGs at ImageNet's sizes made from "
                   "the --data images into DIR (kept for the next run), and bench on them")
    p.add_argument("--make-count", type=int, default=8000, metavar="N", help="with --make-data (default: 8000)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="a registered backend to measure (viewpipe.pipelines.backends(); repeatable; default: all)")
    p.add_argument("--views", default="2", help="views per image: a count (each --size px), or multi-crop view groups "
                   "COUNTxSIZE[@MIN-MAX][:nobox],... e.g. 2x224,6x96@0.05-0.2 (default: 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per row, after one warm-up batch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--size", type=int, default=224, help="output side of each view")
    p.add_argument("--alpha", type=float, default=0.6, help="Beta(α, α) of ContrastiveCrop")
    p.add_argument("--preset", default="mocov2", help="augmentation preset")
    p.add_argument("--hw-decoder-load", type=float, default=None, metavar="F",
                   help="share of the images the DALI loaders decode on the GPU's hardware JPEG decoder, in [0, 1] "
                   "(default: the DALI loader's); also with --train (data.hw_decoder_load)")
    p.add_argument("--dali-plan-ahead", type=int, default=0, metavar="N",
                   help="the DALI loaders plan (and gather the bytes of) up to N batches ahead in a thread instead "
                   "of in DALI's callback on the consumer's thread (0, the default; DaliOptions.plan_ahead); "
                   "also with --train (data.dali_plan_ahead)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--train", action="store_true",
                   help="measure training steps instead: synthetic GPU-resident data, then each backend feeding "
                   "the same model (the ratio is the fraction of the model's speed the loader sustains)")
    p.add_argument("--pass", dest="clean_pass", action="store_true",
                   help="measure the passes over the whole dataset instead (box update, mining, kNN): each "
                   "backend's clean images against the PIL pass (speed, pixel difference), then the box update "
                   "with the --backbone forward")
    p.add_argument("--train-speed", type=float, default=None, metavar="IMG/S",
                   help="with --pass: the training speed (e.g. from --train) an epoch runs at, for each box "
                   "update's share of an epoch")
    p.add_argument("--profile", metavar="DIR", help="with --train: after each row's timing, trace "
                   f"{PROFILED_STEPS} more steps with torch.profiler into DIR/<row>.pt.trace.json (Perfetto, "
                   "chrome://tracing, TensorBoard's profiler plugin)")
    p.add_argument("--method", default="mocov2", help="with --train: the method (a registered one, e.g. mocov2, "
                   "simsiam, simclr, byol)")
    p.add_argument("--backbone", default="", help="with --train or --pass: the backbone (default: resnet50 on a GPU, "
                   "resnet_tiny on the CPU)")
    p.add_argument("--scale", action="store_true", help="measure ImageNet scale instead (tools/bench_scale.py): a "
                   "synthetic index, the sample state and a full epoch planned for 8 ranks at --scale-samples, and "
                   "the listing and probe of --scale-files tiny files")
    p.add_argument("--scale-samples", type=int, default=1_281_167, metavar="N", help="with --scale (0: skip)")
    p.add_argument("--scale-files", type=int, default=100_000, metavar="N", help="with --scale (0: skip)")
    p.add_argument("--soak", action="store_true", help="run --soak-epochs short training epochs with box updates "
                   "and neighbour minings instead, and report the slope of memory, fds, threads and shared-memory "
                   "segments per epoch (tools/bench_soak.py)")
    p.add_argument("--soak-epochs", type=int, default=40, metavar="N", help="with --soak")
    p.add_argument("--report", metavar="FILE", help="with --scale or --soak: the JSON file of the figures "
                   "(default bench-scale.json or bench-soak.json)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `viewpipe bench` (or `--train`): the table or JSON of every row."""
    import torch

    from viewpipe.augment import preset
    from viewpipe.crop import CropConfig
    from viewpipe.pipelines import DaliOptions, LoaderConfig, ViewGroup, backends as registered, get_backend, parse_views
    from viewpipe.sources import open_source

    if args.make_data:
        from viewpipe.tools.bench_data import make_natural

        if not args.data:
            raise ViewpipeError("--make-data needs --data: the images to make the natural-size JPEGs from")
        args.data = str(make_natural(Path(args.data), Path(args.make_data), args.make_count, args.split,
                                     workers=args.workers))
        args.split = "train"
    if args.scale or args.soak:
        from viewpipe.tools import bench_scale, bench_soak

        return (bench_scale if args.scale else bench_soak).main(args)
    if args.clean_pass:  # (with torch's threads as a training run has them)
        from viewpipe.tools.bench_pass import main as pass_main

        return pass_main(args, Path(args.data) if args.data else generated_data(), args.backend or ["torch", "dali",
                                                                                                   "ffcv", "memory"])
    if not torch.cuda.is_available():
        # on the CPU, backends that augment in this process (DALI) share the cores with their own decode
        # threads: one torch thread avoids oversubscription (DataLoader workers already use one each)
        torch.set_num_threads(1)
    data = Path(args.data) if args.data else generated_data()
    backends = args.backend or list(registered())
    for name in backends:
        get_backend(name)  # (an unknown name: one line listing the registered ones)
    hw = args.hw_decoder_load
    if hw is not None and not 0.0 <= hw <= 1.0:
        raise ViewpipeError(f"--hw-decoder-load must be in [0, 1], got {hw}")
    if args.views.isdigit():
        groups = (ViewGroup(int(args.views), args.size, CropConfig().scale),)
    else:
        groups = parse_views(args.views, CropConfig().scale)
    if args.train:
        if len(groups) > 1:
            raise ViewpipeError("--train measures the methods' two-view steps; give --views as a count")
        args.views = groups[0].count
        return train_main(args, data, open_source(data, args.split), backends)  # (the trainer reads a Source)
    source = bench_source(data, args.split, backends)  # (checks the data first)
    n = len(source) if source is not None else len(DatasetIndex.load(data))
    cfg = LoaderConfig(
        views=groups[0].count if len(groups) == 1 else 2, groups=groups if len(groups) > 1 else (),
        batch_size=args.batch_size, crop=CropConfig(alpha=args.alpha),
        augment=preset(args.preset, size=groups[0].size), workers=args.workers,
        dali=DaliOptions(plan_ahead=args.dali_plan_ahead, **({} if hw is None else {"hw_decoder_load": hw})),
    )
    check(n, cfg, args.batches)
    needed = formats_read(backends)
    converted = converted_data(data, args.split, needed, args.workers) if needed else None
    notes: list[str] = []
    rows = run(source, backends, cfg, args.batches, converted=converted, notes=notes)
    where = args.data or "generated images"
    if args.json:
        stock = stock_speed(rows)
        out = {"data": str(where), "images": n, "machine": machine(), "config": {
            "views": cfg.views, "batch_size": cfg.batch_size, "batches": args.batches, "workers": cfg.workers,
            "size": args.size, "alpha": args.alpha, "preset": args.preset, "hw_decoder_load": hw,
            "dali_plan_ahead": args.dali_plan_ahead},
            "rows": [asdict(r) | {"images_per_s": r.images_per_s, "views_per_s": r.views_per_s,
                                  "of_stock_dali": r.images_per_s / stock if stock else None} for r in rows],
            "notes": notes}
        print(json.dumps(out, indent=2))
        return 0
    shape = ", ".join(f"{g.count} × {g.size}px" for g in cfg.view_groups())
    print(f"viewpipe bench: {where} ({n} images), views {shape}, "
          f"batch {cfg.batch_size} × {args.batches}, {cfg.workers} workers")
    if converted is not None and converted != data:
        print(f"converted copy for dali/ffcv: {converted}")
    print(f"machine: {machine()}")
    print(table(rows))
    for note in notes:
        print(f"note: {note}")
    return 0


def bench_source(data: Path, split: str, backends: list[str]) -> Source | None:
    """The Source the PIL ceiling and the reference read; None for a dataset converted with `--format ffcv`
    alone when only FFCV is benched (it has no shards to read images from, and FFCV reads its .beton)."""
    from viewpipe.pipelines import get_backend
    from viewpipe.sources import open_source

    if (data / INDEX).is_file() and not has_shards(data):
        readers = [b for b in backends if get_backend(b).reads in (None, "dali")]
        if readers:
            raise ViewpipeError(f"{data}: the dataset has no DALI shards, which the {', '.join(readers)} rows read; "
                                "convert it with --format both, or bench --backend ffcv alone")
        return None
    return open_source(data, split)


def stock_speed(rows: list[BenchRow]) -> float | None:
    """The faster stock DALI pipeline's images/s (today's or the expert's, whichever measured faster), if one
    was measured: the "÷ stock DALI" column is against the best a stock pipeline did on the same run."""
    from viewpipe.pipelines.baselines import STOCK_DALI

    return max((r.images_per_s for r in rows if r.name.startswith(STOCK_DALI)), default=None)


def table(rows: list[BenchRow]) -> str:
    """The rows with their ratio to the PIL decode ceiling, to the reference loader (torch, boxes) and, when
    it was measured, to the faster stock DALI pipeline (`stock_speed`)."""
    from viewpipe.pipelines.baselines import PIL_DECODE

    ceiling = next((r.images_per_s for r in rows if r.name == PIL_DECODE), None)
    ref = next((r.images_per_s for r in rows if r.reference), None)
    stock = stock_speed(rows)

    def ratio(x: float, to: float | None) -> str:
        return f"{x / to:12.2f}" if to else f"{'-':>12s}"

    lines = [f"{'':52s} {'images/s':>10s} {'views/s':>10s} {'÷ PIL decode':>12s} {'× reference':>12s}"
             + (f" {'÷ stock DALI':>12s}" if stock else "")]
    for r in rows:
        views = f"{r.views_per_s:10.1f}" if r.views > 1 else f"{'-':>10s}"
        lines.append(f"{r.name:52s} {r.images_per_s:10.1f} {views} {ratio(r.images_per_s, ceiling)} "
                     f"{ratio(r.images_per_s, ref)}" + (f" {ratio(r.images_per_s, stock)}" if stock else ""))
    return "\n".join(lines)


def time_steps(trainer: Any, batches: Iterable, steps: int, name: str, profile: str | None = None) -> BenchRow:
    """Time `steps` training steps fed by `batches` after 3 warm-up steps (cuDNN autotuning, worker start); with
    `profile` (a folder), then trace more steps into it (`profile_steps`), after the timing so as not to slow it."""
    import torch
    from tqdm import tqdm

    it = iter(batches)
    for _ in range(3):
        trainer.train_step(next(it), trainer.cfg.optim.lr, 0.0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    images, t0 = 0, time.perf_counter()
    for _ in tqdm(range(steps), desc=name, unit="step", leave=False, disable=None):
        batch = next(it)
        trainer.train_step(batch, trainer.cfg.optim.lr, 0.0)
        images += len(batch.indices)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    row = BenchRow(name, images, time.perf_counter() - t0, trainer.cfg.data.views)
    if profile:
        profile_steps(trainer, it, PROFILED_STEPS, Path(profile) / f"{slug(name)}.pt.trace.json")
    return row


PROFILED_STEPS = 10  # steps of each row in a --profile trace


def slug(name: str) -> str:
    """A file name for a row's name."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def profile_steps(trainer: Any, it: Iterator, steps: int, path: Path) -> None:
    """`steps` training steps under torch.profiler (CPU and CUDA activity, shapes), each split into the loader's
    hand-out and the step, written as a Chrome trace `path` (ui.perfetto.dev, chrome://tracing and TensorBoard's
    profiler plugin read it): what happens between the loader's hand-out and the step."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            with record_function("viewpipe: next batch"):
                batch = next(it)
            with record_function("viewpipe: train_step"):
                trainer.train_step(batch, trainer.cfg.optim.lr, 0.0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def train_main(args: argparse.Namespace, data: Path, source: Source, backends: list[str]) -> int:
    """`viewpipe bench --train`: the method's steps on synthetic views already on the device, then fed by each
    backend (ContrastiveCrop boxes on), in one run; each row's ratio to the synthetic speed."""
    import torch

    from viewpipe.pipelines import Batch, get_backend
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    gpu = torch.cuda.is_available()
    needed = formats_read(backends)
    hw = [] if args.hw_decoder_load is None else [f"data.hw_decoder_load={args.hw_decoder_load}"]
    hw += [f"data.dali_plan_ahead={args.dali_plan_ahead}"]
    converted = converted_data(data, args.split, needed, args.workers) if needed else None
    backbone = args.backbone or ("resnet50" if gpu else "resnet_tiny")
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory() as out:
        def trainer(backend: str) -> Trainer:
            path = converted if get_backend(backend).reads else data
            cfg = load_config(None, [
                f"method={args.method}", f"backbone={backbone}", f"data.path={path}", f"data.split={args.split}",
                f"data.backend={backend}", f"data.size={args.size}", f"data.preset={args.preset}",
                f"data.views={args.views}", f"data.batch_size={args.batch_size}", f"data.workers={args.workers}",
                "ccrop.enabled=true", "ccrop.warmup=0", "ccrop.interval=1", f"ccrop.alpha={args.alpha}",
                f"out={out}", "knn_every=0", "epochs=1000", *hw])
            return Trainer(cfg)

        t = trainer(backends[0])
        try:
            B, S, dev = args.batch_size, args.size, t.device
            g = torch.Generator(device=dev).manual_seed(0)
            views = [torch.randn(B, 3, S, S, device=dev, generator=g) for _ in range(args.views)]
            fixed = Batch(views, torch.zeros(B, dtype=torch.long), torch.arange(B))
            rows.append(time_steps(t, itertools.repeat(fixed), args.batches,
                                   f"synthetic views on the {dev.type}, {args.method} {backbone}", args.profile))
        finally:
            t.close()
        rng = np.random.default_rng(0)
        for name in backends:
            t = trainer(name)
            try:
                t.state.set_boxes(random_boxes(rng, t.n))
                loader = t.loader(1)  # an epoch after the first box update: ContrastiveCrop boxes on
                batches = (b for e in itertools.count(1) for b in (loader.set_epoch(e), loader)[1])
                rows.append(time_steps(t, batches, args.batches, f"{name} loader, {args.views} views, boxes",
                                       args.profile))
            finally:
                t.close()
    synthetic = rows[0].images_per_s
    if args.json:
        print(json.dumps({"machine": machine(), "rows": [asdict(r) | {"images_per_s": r.images_per_s,
                          "of_synthetic": r.images_per_s / synthetic} for r in rows]}, indent=2))
        return 0
    print(f"viewpipe bench --train: {args.method} {backbone}, batch {args.batch_size}, {args.views} views of "
          f"{args.size}px, {args.batches} steps per row; data {args.data or 'generated images'}")
    print(f"machine: {machine()}")
    print(f"{'':52s} {'images/s':>10s} {'× synthetic':>12s}")
    for r in rows:
        print(f"{r.name:52s} {r.images_per_s:10.1f} {r.images_per_s / synthetic:12.2f}")
    return 0
