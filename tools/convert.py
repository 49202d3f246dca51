"""`viewpipe convert`: the command line of the conversion library `viewpipe.convert` (argument parsing, the
summary line, and its errors as one line). Imports neither torch, DALI nor ffcv: `viewpipe convert --help` is
instant."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from viewpipe.errors import ViewpipeError

DESCRIPTION = """Convert an ImageNet-style folder (root/<class>/<image>) or a .npz JPEG collection to DALI
WebDataset shards and an FFCV .beton, with an index, a report of every skipped file (convert_report.json) and
--resume after an interruption; --verify DST re-reads a finished conversion and names every damaged sample.
Conversions that write an FFCV file downscale images to a longer side of {side} px by default (FFCV's own
ImageNet recipe); --max-side 0 keeps natural size."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `viewpipe convert` (every option's help says its default)."""
    from viewpipe.formats import DEFAULT_MAX_PIXELS, FFCV_MAX_SIDE

    cpus = os.cpu_count() or 1
    p = sub.add_parser("convert", help="convert an image folder or .npz to FFCV and DALI formats",
                       description=DESCRIPTION.format(side=FFCV_MAX_SIDE))
    p.add_argument("src", nargs="?", type=Path, help="image folder (root/<class>/<image>) or .npz JPEG collection")
    p.add_argument("dst", nargs="?", type=Path, help="output folder (new or empty; or the interrupted one with --resume)")
    p.add_argument("--format", choices=["ffcv", "dali", "both"], default="both",
                   help="what to write (default: both)")
    p.add_argument("--workers", type=int, default=cpus, help=f"worker processes (default: the CPU count, {cpus} here)")
    p.add_argument("--split", default="train", help="split of a .npz collection (default: train)")
    p.add_argument("--max-side", type=int, default=None, metavar="PX",
                   help="downscale images whose longer side exceeds PX; 0 keeps natural size (default: "
                   f"{FFCV_MAX_SIDE} when an FFCV file is written, the max_resolution of FFCV's ImageNet recipe, "
                   f"ffcv-imagenet's `write_imagenet.sh {FFCV_MAX_SIDE} 0.50 90`; 0 with --format dali; --resume: "
                   "what the conversion was started with)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"skip larger images, decompression bombs (default: {DEFAULT_MAX_PIXELS}, PIL's threshold)")
    p.add_argument("--ffcv-mode", choices=["jpg", "raw", "proportion", "smart"], default="jpg",
                   help="FFCV's write_mode for the images (default: jpg; ffcv-imagenet uses proportion, half the "
                   "images JPEG and half raw pixels: FFCV's compress_probability 0.5, larger files, faster decode)")
    p.add_argument("--jpeg-quality", type=int, default=90,
                   help="quality of FFCV's JPEGs and of re-encoded shard images (default: 90, as ffcv-imagenet)")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per DALI shard (default: 10000)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion into DST (default: off, DST must be new or empty)")
    p.add_argument("--verify", type=Path, metavar="DST",
                   help="re-read a finished conversion and check it, instead of converting (default: off)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `viewpipe convert` (or `--verify`): a summary line on success; problems as a ViewpipeError."""
    from viewpipe.convert import NO_SPACE, Damaged, convert, verify
    from viewpipe.formats import REPORT

    if args.verify:
        t = time.perf_counter()
        try:
            out = verify(args.verify)
        except Damaged as exc:  # one line per damaged sample, then the count (the error line)
            if len(exc.problems) > 1:
                for line in exc.problems:
                    print(f"viewpipe: error: {line}", file=sys.stderr)
            raise
        except OSError as exc:  # a missing or unreadable shard, index or FFCV file
            raise ViewpipeError(f"{exc.filename or args.verify}: {exc.strerror or exc}; the conversion is damaged, "
                                "convert again") from None
        except (KeyError, ValueError) as exc:  # a damaged report or index (damaged shards are Damaged's problems)
            raise ViewpipeError(f"{args.verify}: damaged ({type(exc).__name__}: {exc}); convert again") from None
        parts = ", ".join(f"{k}: {v} samples" for k, v in out.items() if k != "samples")
        print(f"verified {args.verify}: {out['samples']} samples ({parts}) in {time.perf_counter() - t:.1f} s")
        return 0
    if args.src is None or args.dst is None:
        raise ViewpipeError("convert needs SRC and DST (or --verify DST); see `viewpipe convert --help`")
    if args.workers < 1 or args.shard_size < 1 or not 1 <= args.jpeg_quality <= 100:
        raise ViewpipeError("--workers and --shard-size must be >= 1 and --jpeg-quality in 1..100")
    if args.max_side is not None and args.max_side < 0:
        raise ViewpipeError(f"--max-side must be 0 (keep natural size) or a side in pixels, got {args.max_side}")
    formats = ("ffcv", "dali") if args.format == "both" else (args.format,)
    try:
        report = convert(args.src, args.dst, formats, args.workers, args.split, args.max_side, args.max_pixels,
                         args.ffcv_mode, args.jpeg_quality, args.shard_size, args.resume)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise ViewpipeError(f"no space left while writing {exc.filename or args.dst}; free space and rerun "
                                "with --resume") from None
        raise ViewpipeError(f"{exc.filename or args.dst}: {exc.strerror}; fix it and rerun with --resume") from None
    except KeyboardInterrupt:
        import multiprocessing as mp

        for child in mp.active_children():  # ffcv's writer processes are not daemons: stop them
            child.terminate()
        print(f"viewpipe: interrupted; rerun with --resume to continue into {args.dst}", file=sys.stderr)
        return 130
    print(f"converted {args.src} -> {args.dst} ({'+'.join(formats)}): {report['files_seen']} files seen, "
          f"{report['samples_written']} samples written, {report['files_skipped']} skipped "
          f"({', '.join(f'{k}: {v}' for k, v in report['skipped_by_reason'].items()) or 'none'}), "
          f"{len(report['converted'])} converted, in {report['seconds']:.1f} s ({report['files_per_s']} files/s); "
          f"report: {args.dst / REPORT}")
    return 0
