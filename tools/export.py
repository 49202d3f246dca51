"""`viewpipe export`: a pretrained backbone as a state dict that stock torchvision or timm models load strictly.

  viewpipe export RUN_OR_CKPT --format torchvision --out resnet50.pth   torchvision.models.resnet50() loads it
  viewpipe export RUN_OR_CKPT --format timm --out vits.pth              timm's vit_small_patch16_224 loads it

RUN_OR_CKPT is a run folder of `viewpipe pretrain` (its last.pt, checksum verified) or a checkpoint file. The
file written is a plain state dict (`torch.load` it, then `model.load_state_dict(sd)`), with a zero classifier
(--num-classes rows, default 1000) so that a strict load succeeds; --no-head leaves it out. CIFAR ResNets
(3×3 stem) need the stock model's conv1 and maxpool replaced first; a ViT's heads must be given to timm
(printed after the export). Names: `viewpipe.trainers.export`.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `export`."""
    p = sub.add_parser("export", help="write a pretrained backbone as a torchvision / timm state dict",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CKPT", help="run folder of `viewpipe pretrain` or a checkpoint file")
    p.add_argument("--format", required=True, choices=["torchvision", "timm"], help="the target's weight names")
    p.add_argument("--out", required=True, help="the .pth file to write")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="rows of the zero classifier written for a strict load (default: 1000)")
    p.add_argument("--no-head", action="store_true",
                   help="write no classifier (load with strict=False: only fc / head is then missing)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `viewpipe export` with parsed arguments; prints what was written and how to load it."""
    from viewpipe.trainers.checkpoint import warn
    from viewpipe.trainers.export import export

    info = export(args.run, args.out, args.format, num_classes=args.num_classes, head=not args.no_head)
    for w in info.warnings:
        warn(w)
    load = info.how_to_load()
    if args.json:
        print(json.dumps({"out": str(args.out), "checkpoint": str(info.source), "backbone": info.backbone,
                          "format": info.format, "num_classes": info.num_classes, "heads": info.heads,
                          "load_into": load}))
    else:
        head = f"a zero classifier of {info.num_classes} classes" if info.num_classes else "no classifier"
        print(f"wrote {args.out}: {info.backbone} from {info.source} in {info.format}'s names, {head}; load it into "
              f"{load}")
    return 0
