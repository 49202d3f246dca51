"""`viewpipe pretrain` (a config file plus dotted overrides, resumable) and `viewpipe demo`, the main job on
generated data: pretrain MoCo v2 + ContrastiveCrop, update the boxes, and score them against the true ones."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# (torch, numpy and the trainers are imported where they are used: `viewpipe --help` stays light)


def pretrain_main(args: argparse.Namespace) -> int:
    from viewpipe.trainers.config import config_names, help_config, load_config

    if args.help_config:
        print(help_config())
        print(f"\nShipped configs (--config NAME): {', '.join(config_names())}")
        return 0
    cfg = load_config(args.config, args.overrides)
    from viewpipe.trainers.engine import pretrain

    result = pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: epoch {result['epoch']}, step {result['step']}; checkpoint {Path(cfg.out) / 'last.pt'}")
    return 0


def _cache() -> Path:
    return Path(os.environ.get("VIEWPIPE_CACHE", Path.home() / ".cache" / "viewpipe"))


def demo_data(n_train: int, n_test: int, workers: int) -> tuple[Path, Path, Path]:
    """Generated train and test folders (coloured objects on clutter, true boxes in boxes.npy) and the train
    set converted for DALI and FFCV; made once and cached."""
    from viewpipe.synthetic import make_folder
    from viewpipe.convert import convert

    root = _cache() / "demo" / f"n{n_train}-{n_test}"
    train, test, converted = root / "train", root / "test", root / "train-converted"
    for folder, n, seed in ((train, n_train, 0), (test, n_test, 1)):
        if not (folder / "boxes.npy").is_file():
            make_folder(folder, n=n, size_range=(64, 96), seed=seed, progress=True)
    report = converted / "convert_report.json"
    if not report.is_file():
        convert(train, converted, formats=("dali", "ffcv"), workers=workers, resume=converted.exists())
    return train, test, converted


def demo_main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from viewpipe.pipelines import default_backend, get_backend
    from viewpipe.trainers.ccrop import box_iou
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    gpu = torch.cuda.is_available() and args.device != "cpu"
    if not gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    workers = args.workers or max(1, os.cpu_count() or 1)
    train, test, converted = demo_data(args.images, args.images // 4, workers)
    backend = args.backend if args.backend != "auto" else default_backend("cuda" if gpu else "cpu")
    get_backend(backend)  # (an unknown name: one line listing the registered ones)
    out = Path(args.out) if args.out else _cache() / "demo" / time.strftime("run-%Y%m%d-%H%M%S")
    overrides = [
        f"data.path={converted}", f"data.test_path={test}", "data.test_split=train", f"data.backend={backend}",
        f"data.size={args.size}", f"data.batch_size={args.batch_size}", f"data.workers={workers}",
        f"backbone={'resnet18_cifar' if gpu else 'resnet_tiny'}", f"epochs={args.epochs}",
        f"ccrop.warmup={args.epochs // 3}", f"ccrop.interval={max(1, args.epochs // 3)}", "ccrop.alpha=0.6",
        # a network trained for a few minutes has flat heatmaps: at the paper's t = 0.1 (made for 100 warm-up
        # epochs) nearly every box is the whole image; t = 0.5 shows the mechanism (ccrop.threshold=0.1 to compare)
        "ccrop.threshold=0.5",
        "method_args={queue: 4096, momentum: 0.99}", "optim.lr=0.06", "optim.final_lr_ratio=0.1",
        f"knn_every={args.epochs}", "knn_k=50", f"out={out}", f"device={'cuda' if gpu else 'cpu'}", "log_every=10",
    ] + list(args.overrides)
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=None)
    try:
        result = trainer.fit()
        learned = trainer.state.boxes()
    finally:
        trainer.close()
    seconds = time.perf_counter() - t0
    truth = np.load(train / "boxes.npy")
    iou_learned = float(box_iou(learned, truth).mean())
    iou_full = float(box_iou(np.tile([0.0, 0.0, 1.0, 1.0], (len(truth), 1)), truth).mean())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "images_per_s" in r]
    knn = [r["knn_top1"] for r in result["history"] if "knn_top1" in r]
    summary = {
        "device": "cuda" if gpu else "cpu", "backend": backend, "backbone": cfg.backbone, "images": trainer.n,
        "epochs": cfg.epochs, "seconds": round(seconds, 1),
        "images_per_s": round(float(np.median([r["images_per_s"] for r in steps])), 1) if steps else None,
        "data_wait": round(float(np.median([r["data_wait"] for r in steps])), 3) if steps else None,
        "box_updates": trainer.boxes.updates, "box_iou_learned": round(iou_learned, 3),
        "box_iou_full_image": round(iou_full, 3), "knn_top1": knn[-1] if knn else None,
        "box_grid": str(max(out.glob("boxes_epoch*.png"), default="")), "checkpoint": str(out / "last.pt"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"viewpipe demo: MoCo v2 + ContrastiveCrop, {summary['backbone']} on {summary['device']} "
          f"({backend} backend), {summary['images']} generated images, {cfg.epochs} epochs in {seconds:.0f} s")
    print(f"  throughput       {summary['images_per_s']} images/s (median), waiting for data "
          f"{100 * (summary['data_wait'] or 0):.0f}% of the time")
    print(f"  box updates      {summary['box_updates']}; mean IoU with the true object boxes: learned "
          f"{iou_learned:.3f}, full image {iou_full:.3f}")
    print(f"  kNN top-1        {summary['knn_top1']:.1f}% on {args.images // 4} test images (12 classes, chance 8.3%)")
    print(f"  boxes drawn in   {summary['box_grid']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a method (MoCo v2, SimSiam, ...) from a YAML config",
                       description="Pretrain from a YAML config with dotted overrides, e.g. viewpipe pretrain "
                       "--config mocov2_ccrop_cifar10 optim.lr=0.3 method_args={queue:4096}. --config takes a file or "
                       "the name of a shipped config; values may refer to others (ccrop.size=${data.size}); the run "
                       "folder gets the resolved config.yaml. --help-config lists every key. Under torchrun each "
                       "process is one rank; data.batch_size is the global batch.")
    p.add_argument("--config", help="YAML config file, or the name of a shipped config, e.g. mocov2_ccrop_cifar10 "
                   "(default: the built-in defaults)")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its type, default and meaning, and the shipped configs; exit")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' (OUT/last.pt when it exists)")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.lr=0.3 data.backend=dali "
                   "'method_args={queue:1024}' data.groups[1].size=96")
    p.set_defaults(func=pretrain_main)

    d = sub.add_parser("demo", help="the main job on generated images: pretrain, update boxes, score them",
                       description="Generates images of coloured objects on clutter with known boxes, converts "
                       "them, pretrains MoCo v2 + ContrastiveCrop on whatever device is here, updates the boxes, "
                       "and prints throughput, the learned boxes' IoU with the true ones and kNN accuracy.")
    d.add_argument("--images", type=int, default=2400, help="generated training images (a quarter more for test)")
    d.add_argument("--epochs", type=int, default=6)
    d.add_argument("--size", type=int, default=48, help="view side")
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--workers", type=int, default=0, help="loader threads/processes (default: all cores)")
    d.add_argument("--backend", default="auto", metavar="NAME",
                   help="a registered backend, or auto: the one preferred on the device (DALI on a GPU, FFCV on the CPU)")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--out", help="run folder (default: the cache's demo/run)")
    d.add_argument("--json", action="store_true")
    d.add_argument("overrides", nargs="*", help="config overrides, e.g. epochs=3")
    d.set_defaults(func=demo_main)

