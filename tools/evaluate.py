"""`viewpipe eval`: evaluate a pretrained backbone from a checkpoint (the protocols: `viewpipe.trainers.eval`).

  viewpipe eval knn    --checkpoint C --train DATA --test DATA   weighted kNN (k 200, τ 0.1), top-1 %
  viewpipe eval linear --checkpoint C --train DATA --test DATA   linear probe (100 epochs), last and best top-1 %

DATA is an image folder, a .npz JPEG collection (its split from --split-train / --split-test) or a converted
dataset, labelled (an unlabelled folder of images is refused: evaluation needs labels). kNN refuses a test set
that is its train set (every image finds itself) unless --allow-same-set. The checkpoint is what `viewpipe
pretrain` writes: it names the backbone and holds its weights, the view size of pretraining (the default
--size) and the normalisation. It is read as --resume and `export` read it: its checksum verified, and a damaged
last.pt replaced by the last.prev.pt beside it, with one warning line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viewpipe.errors import ViewpipeError

if TYPE_CHECKING:  # torch and the trainers are imported when a command runs, so that `viewpipe --help` is quick
    import torch

    from viewpipe.trainers.models import Backbone

REQUIRED_KEYS = ("backbone_name", "backbone", "image_size", "mean", "std")
_FIX = "give a checkpoint written by `viewpipe pretrain` (runs/<name>/last.pt)"


@dataclass
class Pretrained:
    """A backbone loaded from a checkpoint, with what evaluating it needs."""

    backbone: Backbone
    name: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    path: Path


def load_checkpoint(path: str | os.PathLike[str]) -> Pretrained:
    """The backbone of a pretraining checkpoint; every problem is one `ViewpipeError` line (what, where, what
    to do)."""
    from viewpipe.trainers.checkpoint import load_checkpoint as load_checked
    from viewpipe.trainers.checkpoint import previous_path, warn
    from viewpipe.trainers.models import restore_backbone

    path = Path(path)
    if not path.is_file() and (path.is_dir() or not previous_path(path).is_file()):
        what = "is a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint"
        raise ViewpipeError(f"{path}: {what}; {_FIX}")
    # the checked reader of --resume and export: the checksum verified, last.prev.pt when last.pt is damaged
    # (one warning line then); a file without the checksum (plain torch.save) is read as before, unverified
    ckpt, used, notes = load_checked(path, use="read")
    if used != path:
        warn(notes[0])
    path = used
    if missing := [k for k in REQUIRED_KEYS if k not in ckpt]:
        raise ViewpipeError(f"{path}: not a viewpipe checkpoint (missing {', '.join(missing)}); {_FIX}")
    backbone, name = restore_backbone(ckpt, path, _FIX), ckpt["backbone_name"]
    try:
        size, mean, std = int(ckpt["image_size"]), tuple(float(v) for v in ckpt["mean"]), tuple(float(v) for v in ckpt["std"])
    except (TypeError, ValueError) as exc:
        raise ViewpipeError(f"{path}: bad image_size / mean / std in the checkpoint ({exc}); {_FIX}") from None
    if size <= 0 or len(mean) != 3 or len(std) != 3:
        raise ViewpipeError(f"{path}: bad image_size {size} or mean/std {mean}/{std} in the checkpoint; {_FIX}")
    return Pretrained(backbone, name, size, mean, std, path)


def pick_device(name: str) -> torch.device:
    """The torch device `--device` names; "auto": CUDA when available."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ViewpipeError(f"--device {name}: no CUDA device is available; use --device cpu")
    return torch.device(name)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `eval` with its `knn` and `linear` subcommands."""
    p = sub.add_parser("eval", help="kNN or linear-probe evaluation of a pretrained checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    knn = protocols.add_parser("knn", help="weighted kNN (InstDisc): train features as the bank, top-1 on test")
    linear = protocols.add_parser("linear", help="linear probe on the frozen backbone (100 epochs of SGD, lr × 0.1 "
                                  "at 60%% and 80%%; last and best epoch's top-1)")
    for q in (knn, linear):
        q.add_argument("--checkpoint", required=True, help="checkpoint written by `viewpipe pretrain`")
        q.add_argument("--train", required=True, help="training data (image folder, .npz or converted dataset)")
        q.add_argument("--test", required=True, help="test data")
        q.add_argument("--split-train", default="train", help="split of a .npz training collection (default: train)")
        q.add_argument("--split-test", default="test", help="split of a .npz test collection (default: test)")
        q.add_argument("--size", type=int, default=0,
                       help="side of the clean images (and linear training crops); default: the checkpoint's view size")
        q.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="the backend's workers (threads or processes)")
        q.add_argument("--backend", default="auto",
                       help="the backend that reads the clean images: a registered name (torch: PIL, dali, ffcv, "
                       "memory), auto: the device's default (dali on CUDA, ffcv on the CPU); data it cannot read "
                       "as given (ffcv and an unconverted folder) is read with PIL (default: auto)")
        q.add_argument("--no-amp", action="store_true", help="float32 forward on CUDA (default: bf16 autocast)")
        q.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")
        q.add_argument("--json", action="store_true", help="print one JSON object")
    knn.add_argument("--k", type=int, default=200, help="neighbours (default: 200)")
    knn.add_argument("--t", type=float, default=0.1, help="temperature τ of the weights exp(sim/τ) (default: 0.1)")
    knn.add_argument("--batch-size", type=int, default=256, help="batch of the feature passes")
    knn.add_argument("--allow-same-set", action="store_true",
                     help="allow --test to be the --train set (refused by default: every image finds itself, ~100%%)")
    linear.add_argument("--protocol", dest="linear_protocol", choices=["small", "imagenet"], default="small",
                        help="small: batch 512, lr 10, test at --size; imagenet: batch 256, lr 30, 224 crops, "
                        "test resize 256 + centre crop (default: small)")
    linear.add_argument("--epochs", type=int, default=None, help="default: 100 (lr × 0.1 at 60%% and 80%%)")
    linear.add_argument("--lr", type=float, default=None, help="default: 10 (small) or 30 (imagenet)")
    linear.add_argument("--batch-size", type=int, default=None, help="default: 512 (small) or 256 (imagenet)")
    linear.add_argument("--no-augment", action="store_true",
                        help="train on features of clean images computed once (fast; departs from the protocol, "
                        "which trains on RandomResizedCrop + flip)")
    linear.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def pass_backend(name: str, device: torch.device) -> str:
    """The backend of the clean passes: `name`, or with "auto" the device type's default."""
    from viewpipe.pipelines import default_backend, get_backend

    return default_backend(device.type) if name == "auto" else get_backend(name).name


def main(args: argparse.Namespace) -> int:
    """Run `viewpipe eval knn|linear` with parsed arguments; prints the result."""
    from viewpipe.trainers.clean import CleanOptions
    from viewpipe.trainers.eval import LinearConfig, knn_accuracy, linear_probe

    model = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    model.backbone.to(device)
    size = args.size or model.image_size
    progress = not args.no_progress
    base: dict[str, Any] = {"checkpoint": str(model.path), "backbone": model.name, "train": args.train,
                            "test": args.test, "device": str(device)}
    reader = {"backend": pass_backend(args.backend, device), "amp": device.type == "cuda" and not args.no_amp}
    if args.protocol == "knn":
        clean = CleanOptions(size=size, batch_size=args.batch_size, workers=args.workers, mean=model.mean,
                             std=model.std, split=args.split_train, device=device, progress=progress, **reader)
        top1 = knn_accuracy(model.backbone, args.train, args.test, clean, k=args.k, t=args.t,
                            split_test=args.split_test, allow_same_set=args.allow_same_set)
        result = base | {"protocol": "knn", "size": size, "k": args.k, "t": args.t, "top1": top1}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"kNN top-1 {top1:.2f}%  (k {args.k}, τ {args.t}, {size}px clean images; {model.path})")
        return 0
    overrides: dict[str, Any] = {
        k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    overrides |= {"augment": not args.no_augment, "workers": args.workers, "mean": model.mean, "std": model.std,
                  "split_train": args.split_train, "split_test": args.split_test, "seed": args.seed,
                  "progress": progress, **reader}
    if args.linear_protocol == "imagenet":
        cfg = LinearConfig.imagenet(**overrides | ({"size": args.size} if args.size else {}))
    else:
        cfg = LinearConfig(size=size, **overrides)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    res = linear_probe(model.backbone, args.train, args.test, cfg, device, log=log)
    if args.json:
        print(json.dumps(base | {"protocol": "linear", "size": cfg.size, "epochs": cfg.epochs, "lr": cfg.lr,
                                 "batch_size": cfg.batch_size, "augment": cfg.augment, "last_top1": res.last_top1,
                                 "best_top1": res.best_top1, "best_epoch": res.best_epoch, "history": res.history}))
    else:
        note = "" if cfg.augment else "  [--no-augment: features of clean images, not the protocol's crops]"
        print(f"linear top-1 {res.last_top1:.2f}% (last epoch {cfg.epochs}); best {res.best_top1:.2f}% at epoch "
              f"{res.best_epoch}{note}")
    return 0
