"""`viewpipe bench`: images/s and views/s of each backend beside the decode-only ceiling, in one run,
so the ratios hold on a noisy machine. Speed is judged here, never in tests."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from viewpipe.augment import preset
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import BACKENDS, LoaderConfig, get_backend
from viewpipe.pipelines.reference import DecodeDataset
from viewpipe.formats import BETON, INDEX
from viewpipe.sources import Source, open_source
from viewpipe.state import SampleState
from viewpipe.synthetic import make_folder

# backends that read a converted dataset, and the format each reads
CONVERTED = {"dali": "dali", "ffcv": "ffcv"}


@dataclass
class BenchRow:
    name: str
    images: int
    seconds: float
    views: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def views_per_s(self) -> float:
        return self.images * self.views / self.seconds


def machine() -> str:
    """One line naming the CPU (and GPU) this ran on."""
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
    from viewpipe.tools.convert import convert

    if (data / INDEX).is_file():
        if "ffcv" in formats and not (data / BETON).is_file():
            raise ViewpipeError(f"{data}: no {BETON}; convert it with --format both to bench the ffcv backend")
        return data
    cache = Path(os.environ.get("VIEWPIPE_CACHE", Path.home() / ".cache" / "viewpipe"))
    key = hashlib.sha1(f"{data.resolve()}|{split}".encode()).hexdigest()[:12]
    dst = cache / "converted" / f"{data.stem}-{split}-{'+'.join(sorted(formats))}-{key}"
    convert(data, dst, formats=("dali", "ffcv") if "ffcv" in formats else ("dali",), workers=workers, split=split,
            resume=dst.exists())
    return dst


def time_batches(loader: Iterable, batches: int, views: int, name: str, count: Callable[[Any], int]) -> BenchRow:
    """Time `batches` batches after one warm-up batch (worker start-up), cycling epochs if needed;
    `count(batch)` is the number of images in a batch."""
    from tqdm import tqdm

    it = iter(loader)
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
    return BenchRow(name, images, time.perf_counter() - t0, views)


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) float32 boxes of 20-50% of each side at random places: what the benchmarks crop around."""
    lo = rng.uniform(0.0, 0.5, size=(n, 2))
    return np.concatenate([lo, lo + rng.uniform(0.2, 0.5, size=(n, 2))], 1).astype(np.float32)


def check(source: Source, cfg: LoaderConfig, batches: int) -> None:
    """Refuse a run that cannot time anything (before any conversion is made for it)."""
    if batches < 1:
        raise ViewpipeError(f"--batches must be at least 1, got {batches}")
    if len(source) < 2 * cfg.batch_size:
        raise ViewpipeError(
            f"the data has {len(source)} images, fewer than two batches of {cfg.batch_size}; lower --batch-size"
        )


def run(source: Source, backends: list[str], cfg: LoaderConfig, batches: int, seed: int = 0,
        converted: Path | None = None) -> list[BenchRow]:
    """The PIL decode ceiling, then per backend its own ceiling (decode only), FFCV's stock decoder (one
    decode per view), and its loader with boxes and without (plain RandomResizedCrop). Converted backends read `converted`, the reference `source`."""
    check(source, cfg, batches)
    if converted is None and any(b in CONVERTED for b in backends):
        raise ViewpipeError(f"backends {', '.join(b for b in backends if b in CONVERTED)} need a converted dataset")
    decode = DataLoader(
        DecodeDataset(source), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
        collate_fn=lambda items: items,
    )
    rows = [time_batches(decode, batches, 1, "decode only (PIL, ceiling)", len)]
    count = lambda b: len(b[2])  # noqa: E731  (every loader's batch: views, labels, indices, ...)
    rng = np.random.default_rng(seed)
    with SampleState.create(len(source)) as state:
        state.set_boxes(random_boxes(rng, len(source)))
        for name in backends:
            factory = get_backend(name)
            data = converted if name in CONVERTED else source
            if name == "dali":
                loader = factory(data, cfg, decode_only=True)
                where = "nvJPEG" if loader.device_id is not None else "CPU"
                rows.append(time_batches(loader, batches, 1, f"dali, decode only ({where}, ceiling)", count))
            if name == "ffcv":
                from viewpipe.pipelines.ffcv import stock_rrc_loader

                rows.append(time_batches(factory(data, cfg, decode_only=True), batches, 1,
                                         "ffcv, decode only (CPU threads, ceiling)", count))
                rows.append(time_batches(stock_rrc_loader(data, cfg), batches, cfg.views,
                                         f"ffcv stock RandomResizedCrop, {cfg.views} decodes per image", count))
            for use_box in (True, False):
                c = replace(cfg, crop=replace(cfg.crop, use_box=use_box))
                label = f"{name}, {cfg.views} views, {'ContrastiveCrop boxes' if use_box else 'RandomResizedCrop'}"
                rows.append(time_batches(factory(data, c, state), batches, cfg.views, label, count))
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure loader throughput beside the decode ceiling",
                       description=__doc__)
    p.add_argument("--data", help="image folder, .npz JPEG collection or converted dataset (default: generated images); "
                   "the dali and ffcv backends read a converted copy, made once and cached")
    p.add_argument("--split", default="train", help="split of a .npz collection (default: train)")
    p.add_argument("--backend", action="append", choices=sorted(BACKENDS),
                   help="backend(s) to measure (repeatable; default: all installed)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per row, after one warm-up batch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--size", type=int, default=224, help="output side of each view")
    p.add_argument("--alpha", type=float, default=0.6, help="Beta(α, α) of ContrastiveCrop")
    p.add_argument("--preset", default="mocov2", help="augmentation preset")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--train", action="store_true",
                   help="measure training steps instead: synthetic GPU-resident data, then each backend feeding "
                   "the same model (the ratio is the fraction of the model's speed the loader sustains)")
    p.add_argument("--method", default="mocov2", help="with --train: the method (mocov2, simsiam)")
    p.add_argument("--backbone", default="", help="with --train: the backbone (default: resnet50 on a GPU, "
                   "resnet_tiny on the CPU)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        # on the CPU, backends that augment in this process (DALI) share the cores with their own decode
        # threads: one torch thread avoids oversubscription (DataLoader workers already use one each)
        torch.set_num_threads(1)
    data = Path(args.data) if args.data else generated_data()
    backends = args.backend or sorted(BACKENDS)
    source = open_source(data, args.split)  # (checks the data first)
    if args.train:
        return train_main(args, data, source, backends)
    cfg = LoaderConfig(
        views=args.views, batch_size=args.batch_size, crop=CropConfig(alpha=args.alpha),
        augment=preset(args.preset, size=args.size), workers=args.workers,
    )
    check(source, cfg, args.batches)
    needed = {CONVERTED[b] for b in backends if b in CONVERTED}
    converted = converted_data(data, args.split, needed, args.workers) if needed else None
    rows = run(source, backends, cfg, args.batches, converted=converted)
    where = args.data or "generated images"
    if args.json:
        out = {"data": str(where), "images": len(source), "machine": machine(), "config": {
            "views": cfg.views, "batch_size": cfg.batch_size, "batches": args.batches, "workers": cfg.workers,
            "size": args.size, "alpha": args.alpha, "preset": args.preset},
            "rows": [asdict(r) | {"images_per_s": r.images_per_s, "views_per_s": r.views_per_s} for r in rows]}
        print(json.dumps(out, indent=2))
        return 0
    print(f"viewpipe bench: {where} ({len(source)} images), {cfg.views} views of {args.size}px, "
          f"batch {cfg.batch_size} × {args.batches}, {cfg.workers} workers")
    if converted is not None and converted != data:
        print(f"converted copy for dali/ffcv: {converted}")
    print(f"machine: {machine()}")
    print(table(rows))
    return 0


def table(rows: list[BenchRow]) -> str:
    """The rows with their ratio to the PIL decode ceiling and to the reference loader (torch, boxes)."""
    ceiling = rows[0].images_per_s
    ref = next((r.images_per_s for r in rows if r.name.startswith("torch,") and "boxes" in r.name), None)
    lines = [f"{'':52s} {'images/s':>10s} {'views/s':>10s} {'÷ PIL decode':>12s} {'× reference':>12s}"]
    for r in rows:
        views = f"{r.views_per_s:10.1f}" if r.views > 1 else f"{'-':>10s}"
        vs_ref = f"{r.images_per_s / ref:12.2f}" if ref else f"{'-':>12s}"
        lines.append(f"{r.name:52s} {r.images_per_s:10.1f} {views} {r.images_per_s / ceiling:12.2f} {vs_ref}")
    return "\n".join(lines)


def time_steps(trainer: Any, batches: Iterable, steps: int, name: str) -> BenchRow:
    """Time `steps` training steps fed by `batches` after 3 warm-up steps (cuDNN autotuning, worker start)."""
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
        images += len(batch[2])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return BenchRow(name, images, time.perf_counter() - t0, trainer.cfg.data.views)


def train_main(args: argparse.Namespace, data: Path, source: Source, backends: list[str]) -> int:
    """`viewpipe bench --train`: the method's steps on synthetic views already on the device, then fed by each
    backend (ContrastiveCrop boxes on), in one run; each row's ratio to the synthetic speed."""
    import itertools

    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    gpu = torch.cuda.is_available()
    needed = {CONVERTED[b] for b in backends if b in CONVERTED}
    converted = converted_data(data, args.split, needed, args.workers) if needed else None
    backbone = args.backbone or ("resnet50" if gpu else "resnet_tiny")
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory() as out:
        def trainer(backend: str) -> Trainer:
            path = converted if backend in CONVERTED else data
            cfg = load_config(None, [
                f"method={args.method}", f"backbone={backbone}", f"data.path={path}", f"data.split={args.split}",
                f"data.backend={backend}", f"data.size={args.size}", f"data.preset={args.preset}",
                f"data.views={args.views}", f"data.batch_size={args.batch_size}", f"data.workers={args.workers}",
                "ccrop.enabled=true", "ccrop.warmup=0", "ccrop.interval=1", f"ccrop.alpha={args.alpha}",
                f"out={out}", "knn_every=0", "epochs=1000"])
            return Trainer(cfg)

        t = trainer(backends[0])
        try:
            B, S, dev = args.batch_size, args.size, t.device
            g = torch.Generator(device=dev).manual_seed(0)
            views = [torch.randn(B, 3, S, S, device=dev, generator=g) for _ in range(args.views)]
            fixed = (views, torch.zeros(B, dtype=torch.long), torch.arange(B))
            rows.append(time_steps(t, itertools.repeat(fixed), args.batches,
                                   f"synthetic views on the {dev.type}, {args.method} {backbone}"))
        finally:
            t.close()
        rng = np.random.default_rng(0)
        for name in backends:
            t = trainer(name)
            try:
                t.state.set_boxes(random_boxes(rng, t.n))
                loader = t.loader(1)  # an epoch after the first box update: ContrastiveCrop boxes on
                batches = (b for e in itertools.count(1) for b in (loader.set_epoch(e), loader)[1])
                rows.append(time_steps(t, batches, args.batches, f"{name} loader, {args.views} views, boxes"))
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
