"""`viewpipe convert`: an ImageNet-style folder (or a `.npz` JPEG collection) to DALI WebDataset shards and
an FFCV `.beton`, with an index, a report of every skipped file, and `--resume` after an interruption.

Stages, each resumable: list the files; probe each one in parallel (read, header, a full decode; the results
are journaled in chunks); write the DALI shards (each complete once its index file exists); write the FFCV
file (temporary name, renamed at the end); then the index, the classes and the report, the report last — a
folder whose `convert_report.json` says `"complete": true` is a finished dataset, anything else is not.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from viewpipe.errors import UnreadableFileError, ViewpipeError, import_optional
from viewpipe.formats import (
    BETON, DEFAULT_MAX_PIXELS, REPORT, DatasetIndex, Probe, ShardWriter, open_image, probe, shard_bytes,
    shard_paths, write_atomic,
)
from viewpipe.sources import FolderSource, NpzSource, Source

WORK = ".work"
CHUNK = 4096  # files per journaled probe chunk
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


# ---------------------------------------------------------------------------- worker side
_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _SOURCE
    _SOURCE = source
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def _read(source: Source, i: int) -> tuple[bytes | None, str]:
    try:
        return source.read(i), ""
    except UnreadableFileError as exc:
        return None, exc.reason


def _probe_item(args: tuple[int, int, int]) -> tuple:
    i, max_pixels, max_side = args
    data, err = _read(_SOURCE, i)  # type: ignore[arg-type]
    p = Probe(skip=err) if data is None else probe(data, max_pixels, max_side)
    return p.height, p.width, p.ext, p.note, p.skip


def _shard_item(args: tuple[int, tuple, int]) -> bytes:
    i, record, quality = args
    data, err = _read(_SOURCE, i)  # type: ignore[arg-type]
    if data is None:
        raise ViewpipeError(f"{_SOURCE.describe(i)}: became unreadable during the conversion ({err}); rerun with --resume")  # type: ignore[union-attr]
    return shard_bytes(data, Probe(*record), quality)


class _FFCVDataset:
    """The accepted samples as (RGB uint8 array, label) for ffcv's DatasetWriter (which runs it in workers)."""

    def __init__(self, source: Source, ids: np.ndarray, labels: np.ndarray) -> None:
        self.source, self.ids, self.labels = source, ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
        return np.asarray(open_image(self.source.read(int(self.ids[k])))), int(self.labels[k])


# ---------------------------------------------------------------------------- the conversion
def open_convert_source(path: Path, split: str) -> Source:
    if path.suffix == ".npz":
        return NpzSource(path, split)
    return FolderSource(path, extensions=None)


def _fingerprint(source: Source) -> str:
    h = hashlib.sha256()
    for i in range(len(source)):
        h.update(source.describe(i).encode(errors="replace") + b"\0")
    h.update(np.ascontiguousarray(source.labels).tobytes())
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def _pool(workers: int, source: Source):  # noqa: ANN202
    import multiprocessing as mp

    return mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(source,))


def _progress(it: Iterator, total: int, desc: str, unit: str = "file") -> Iterator:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, smoothing=0.1, disable=None)


def convert(
    src: Path,
    dst: Path,
    formats: tuple[str, ...] = ("ffcv", "dali"),
    workers: int = 1,
    split: str = "train",
    max_side: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ffcv_mode: str = "jpg",
    jpeg_quality: int = 90,
    shard_size: int = 10_000,
    resume: bool = False,
) -> dict:
    """Convert `src` into `dst`; returns the report (also written to `dst/convert_report.json`)."""
    t0 = time.perf_counter()
    source = open_convert_source(src, split)
    options = {"formats": sorted(formats), "split": split, "max_side": max_side, "max_pixels": max_pixels,
               "ffcv_mode": ffcv_mode, "jpeg_quality": jpeg_quality, "shard_size": shard_size}
    work = dst / WORK
    report_path = dst / REPORT
    if resume and report_path.exists() and json.loads(report_path.read_text()).get("complete"):
        report = json.loads(report_path.read_text())
        if report["options"] != options:
            raise ViewpipeError(f"{dst}: already finished with other options ({report['options']})")
        return report  # nothing left to do
    _prepare(src, dst, work, source, options, resume)

    # 1. probe every file, journaled in chunks
    stages: dict[str, float] = {}
    t = time.perf_counter()
    records = _probe_all(source, work, workers, max_pixels, max_side)
    stages["probe"] = time.perf_counter() - t
    ok = np.array([not r[4] for r in records], dtype=bool)
    ids = np.flatnonzero(ok)
    labels = source.labels[ids]
    n = len(ids)
    if n == 0:
        _write_report(dst, src, source, records, options, t0, complete=False)
        raise ViewpipeError(f"{src}: none of its {len(source)} files could be converted; the reasons are in {dst / REPORT}")
    hw = np.array([records[i][:2] for i in ids], dtype=np.int32).reshape(-1, 2)  # after any downscale
    shards = np.full(n, -1, np.int32)
    offsets = np.zeros(n, np.int64)
    nbytes = np.zeros(n, np.int64)

    # 2. DALI WebDataset shards
    if "dali" in formats:
        t = time.perf_counter()
        _write_shards(source, dst, ids, labels, records, workers, jpeg_quality, shard_size, shards, offsets, nbytes)
        stages["dali"] = time.perf_counter() - t

    # 3. FFCV
    if "ffcv" in formats and not (dst / BETON).exists():
        t = time.perf_counter()
        import_optional("ffcv.writer", "ffcv", "FFCV")  # about 6 s: ffcv compiles numba code on import
        stages["ffcv_import"] = time.perf_counter() - t
        t = time.perf_counter()
        _write_beton(source, dst, ids, labels, hw, workers, max_side, ffcv_mode, jpeg_quality)
        stages["ffcv"] = time.perf_counter() - t

    # 4. index, classes, report (last)
    DatasetIndex(labels=labels.astype(np.int64), heights=hw[:, 0], widths=hw[:, 1],
                 sources=np.array([source.describe(int(i)).encode() for i in ids], dtype=np.bytes_),
                 shards=shards, offsets=offsets, nbytes=nbytes, classes=list(source.classes)).save(dst)
    report = _write_report(dst, src, source, records, options, t0, complete=True, stages=stages)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _prepare(src: Path, dst: Path, work: Path, source: Source, options: dict, resume: bool) -> None:
    """Create `dst`, or check that `--resume` continues the same conversion."""
    listing = work / "listing.json"
    fingerprint = _fingerprint(source)
    if resume and listing.exists():
        prev = json.loads(listing.read_text())
        if prev["options"] != options:
            raise ViewpipeError(f"{dst}: the interrupted conversion used other options ({prev['options']}); "
                                "resume with the same options, or convert into an empty folder")
        if prev["fingerprint"] != fingerprint:
            raise ViewpipeError(f"{src}: the source changed since the interrupted conversion "
                                f"({prev['files']} files then, {len(source)} now); convert into an empty folder")
        return
    if dst.exists() and any(dst.iterdir()):
        report = dst / REPORT
        done = report.exists() and json.loads(report.read_text()).get("complete")
        what = "a finished conversion" if done else "files (an interrupted conversion? add --resume)"
        raise ViewpipeError(f"{dst}: already holds {what}; choose an empty or new folder")
    try:
        work.mkdir(parents=True, exist_ok=True)
        _write_json(listing, {"source": str(src), "files": len(source), "fingerprint": fingerprint, "options": options})
    except OSError as exc:
        raise ViewpipeError(f"{dst}: cannot write there ({exc.strerror}); choose a writable folder") from None


def _probe_all(source: Source, work: Path, workers: int, max_pixels: int, max_side: int) -> list[tuple]:
    n_chunks = -(-len(source) // CHUNK)
    todo = [c for c in range(n_chunks) if not (work / f"probe-{c:06d}.json").exists()]
    done_files = len(source) - sum(min(CHUNK, len(source) - c * CHUNK) for c in todo)
    bar = _progress(iter(()), len(source), "probe")
    bar.update(done_files)
    if todo:
        with _pool(workers, source) as pool:
            for c in todo:
                items = [(i, max_pixels, max_side) for i in range(c * CHUNK, min((c + 1) * CHUNK, len(source)))]
                chunk = []
                for rec in pool.imap(_probe_item, items, chunksize=16):
                    chunk.append(rec)
                    bar.update(1)
                _write_json(work / f"probe-{c:06d}.json", chunk)
    bar.close()
    records: list[tuple] = []
    for c in range(n_chunks):
        records.extend(tuple(r) for r in json.loads((work / f"probe-{c:06d}.json").read_text()))
    return records


def _write_shards(source: Source, dst: Path, ids: np.ndarray, labels: np.ndarray, records: list[tuple],
                  workers: int, quality: int, shard_size: int, shards: np.ndarray, offsets: np.ndarray,
                  nbytes: np.ndarray) -> None:
    n = len(ids)
    (dst / "wds").mkdir(exist_ok=True)
    bar = _progress(iter(()), n, "dali shards", "img")
    with _pool(workers, source) as pool:
        for s in range(-(-n // shard_size)):
            lo, hi = s * shard_size, min((s + 1) * shard_size, n)
            tar_path, idx_path = shard_paths(dst, s)
            shards[lo:hi] = s
            if idx_path.exists():  # complete from an earlier run: read its offsets back
                _offsets_from_index(idx_path, offsets[lo:hi], nbytes[lo:hi])
                bar.update(hi - lo)
                continue
            writer = ShardWriter(tar_path, idx_path)
            items = [(int(ids[k]), records[ids[k]], quality) for k in range(lo, hi)]
            for k, data in zip(range(lo, hi), pool.imap(_shard_item, items, chunksize=8)):
                writer.add(k, int(labels[k]), data, records[ids[k]][2])
                nbytes[k] = len(data)
                bar.update(1)
            writer.close()
            offsets[lo:hi] = writer.offsets
    bar.close()


def _offsets_from_index(idx_path: Path, offsets: np.ndarray, nbytes: np.ndarray) -> None:
    lines = idx_path.read_text().splitlines()[1:]
    for k, line in enumerate(lines):
        _, off, size, *_ = line.split()
        offsets[k], nbytes[k] = int(off), int(size)


def _write_beton(source: Source, dst: Path, ids: np.ndarray, labels: np.ndarray, hw: np.ndarray, workers: int,
                 max_side: int, mode: str, quality: int) -> None:
    import_optional("ffcv", "ffcv", "FFCV")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    tmp = dst / (BETON + ".tmp")
    tmp.unlink(missing_ok=True)
    # ffcv's writer waits forever if a worker fails to write, so check the space first: an estimate,
    # the raw pixels, an eighth of them for JPEG (about what quality 90 takes)
    need = int((hw[:, 0].astype(np.int64) * hw[:, 1] * 3).sum() // (8 if mode == "jpg" else 1))
    free = shutil.disk_usage(dst).free
    if need > free:
        raise ViewpipeError(f"{dst}: about {need / 2**30:.1f} GiB needed for {BETON}, {free / 2**30:.1f} GiB free; "
                            "free space (or use --ffcv-mode jpg / --max-side) and rerun with --resume")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_side or None, jpeg_quality=quality),
              "label": IntField()}
    DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(
        _FFCVDataset(source, ids, labels), chunksize=64)
    os.replace(tmp, dst / BETON)


def _write_report(dst: Path, src: Path, source: Source, records: list[tuple], options: dict, t0: float,
                  complete: bool, stages: dict[str, float] | None = None) -> dict:
    skipped = [{"file": source.describe(i), "reason": r[4]} for i, r in enumerate(records) if r[4]]
    stray = getattr(source, "stray", [])
    skipped += [{"file": p, "reason": "not in a class folder"} for p in stray]
    converted = [{"file": source.describe(i), "conversion": r[3]} for i, r in enumerate(records) if r[3] and not r[4]]
    seen = len(records) + len(stray)
    written = sum(1 for r in records if not r[4])
    if seen != written + len(skipped):
        raise RuntimeError(f"internal error: {seen} files seen but {written} written + {len(skipped)} skipped")
    reasons: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    seconds = time.perf_counter() - t0
    report = {
        "complete": complete, "source": str(src), "destination": str(dst), "options": options,
        "files_seen": seen, "samples_written": written, "files_skipped": len(skipped),
        "skipped_by_reason": reasons, "skipped": skipped, "converted": converted,
        "classes": len(source.classes), "empty_classes": getattr(source, "empty_classes", []),
        "unlistable_folders": getattr(source, "unlistable", []),
        "seconds": round(seconds, 3), "files_per_s": round(seen / seconds, 1) if seconds > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in (stages or {}).items()},  # this run's (not resumed) stages
    }
    _write_json(dst / REPORT, report)
    return report


# ---------------------------------------------------------------------------- verification
def verify(dst: Path) -> dict:
    """Re-read everything a conversion wrote: counts, labels, sizes and decodability of every sample."""
    report_path = dst / REPORT
    if not report_path.exists() or not json.loads(report_path.read_text()).get("complete"):
        raise ViewpipeError(f"{dst}: not a finished conversion (no complete {REPORT}); run or resume `viewpipe convert`")
    report = json.loads(report_path.read_text())
    index = DatasetIndex.load(dst)
    n = len(index)
    if report["samples_written"] != n:
        raise ViewpipeError(f"{dst}: the report says {report['samples_written']} samples but the index has {n}")
    out: dict[str, Any] = {"samples": n}
    if "dali" in report["options"]["formats"]:
        out["dali"] = _verify_shards(dst, index)
    if "ffcv" in report["options"]["formats"]:
        out["ffcv"] = _verify_beton(dst, index)
    return out


def _verify_shards(dst: Path, index: DatasetIndex) -> int:
    import tarfile

    seen = 0
    for s in _progress(iter(sorted(set(index.shards.tolist()))), None, "verify dali", "shard"):  # type: ignore[arg-type]
        tar_path, idx_path = shard_paths(dst, s)
        rows = np.flatnonzero(index.shards == s)
        lines = idx_path.read_text().splitlines()
        if lines[0] != f"v1.2 {len(rows)}":
            raise ViewpipeError(f"{idx_path}: expected 'v1.2 {len(rows)}', found {lines[0]!r}; convert again")
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for k, line in zip(rows, lines[1:]):
                key = f"{k:09d}"
                ext, off, size = line.split()[:3]
                data = tar.extractfile(members[f"{key}.{ext}"]).read()  # type: ignore[union-attr]
                meta = np.frombuffer(tar.extractfile(members[f"{key}.meta"]).read(), "<i8")  # type: ignore[union-attr]
                cls = int(tar.extractfile(members[f"{key}.cls"]).read())  # type: ignore[union-attr]
                if (meta[0], meta[1], cls) != (k, index.labels[k], index.labels[k]):
                    raise ViewpipeError(f"{tar_path}: sample {key} carries index/label {meta.tolist()}, {cls}; "
                                        f"the index says {k}, {index.labels[k]}")
                if (int(off), int(size)) != (index.offsets[k], index.nbytes[k]) or len(data) != int(size):
                    raise ViewpipeError(f"{tar_path}: sample {key} is not where the index says; convert again")
                img = open_image(data)
                if (img.height, img.width) != (index.heights[k], index.widths[k]):
                    raise ViewpipeError(f"{tar_path}: sample {key} decodes to {img.width}x{img.height}, "
                                        f"the index says {index.widths[k]}x{index.heights[k]}")
                seen += 1
    if seen != len(index):
        raise ViewpipeError(f"{dst}: the shards hold {seen} samples, the index {len(index)}; convert again")
    return seen


def _verify_beton(dst: Path, index: DatasetIndex) -> int:
    import_optional("ffcv", "ffcv", "FFCV")
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    path = dst / BETON
    reader = Reader(str(path))
    if reader.num_samples != len(index) or reader.field_names[0] != "image":
        raise ViewpipeError(f"{path}: holds {reader.num_samples} samples, the index {len(index)}; convert again")
    image = reader.metadata["f0"]  # fields are stored by position: f0 image, f1 label
    if not (np.array_equal(image["height"], index.heights) and np.array_equal(image["width"], index.widths)):
        raise ViewpipeError(f"{path}: image sizes differ from the index; convert again")
    loader = Loader(str(path), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]})
    labels = []
    for _, lab in _progress(iter(loader), len(loader), "verify ffcv", "batch"):
        labels.append(np.asarray(lab).reshape(-1))
    got = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if not np.array_equal(got, index.labels):
        raise ViewpipeError(f"{path}: labels read back differ from the index; convert again")
    return len(got)


# ---------------------------------------------------------------------------- command line
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an image folder or .npz to FFCV and DALI formats", description=__doc__)
    p.add_argument("src", nargs="?", type=Path, help="image folder (root/<class>/<image>) or .npz JPEG collection")
    p.add_argument("dst", nargs="?", type=Path, help="output folder (new or empty; or the interrupted one with --resume)")
    p.add_argument("--format", choices=["ffcv", "dali", "both"], default="both")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--split", default="train", help="split of a .npz collection")
    p.add_argument("--max-side", type=int, default=0, help="downscale images whose longer side exceeds this")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images (decompression bombs)")
    p.add_argument("--ffcv-mode", choices=["jpg", "raw", "proportion", "smart"], default="jpg")
    p.add_argument("--jpeg-quality", type=int, default=90, help="for FFCV jpg mode and re-encoded shard images")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per DALI shard")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST")
    p.add_argument("--verify", type=Path, metavar="DST", help="re-read a finished conversion and check it")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.verify:
        import tarfile

        t = time.perf_counter()
        try:
            out = verify(args.verify)
        except OSError as exc:  # a missing or unreadable shard, index or FFCV file
            raise ViewpipeError(f"{exc.filename or args.verify}: {exc.strerror or exc}; the conversion is damaged, "
                                "convert again") from None
        except (tarfile.TarError, KeyError, ValueError) as exc:  # a damaged shard or index file
            raise ViewpipeError(f"{args.verify}: damaged ({type(exc).__name__}: {exc}); convert again") from None
        parts = ", ".join(f"{k}: {v} samples" for k, v in out.items() if k != "samples")
        print(f"verified {args.verify}: {out['samples']} samples ({parts}) in {time.perf_counter() - t:.1f} s")
        return 0
    if args.src is None or args.dst is None:
        raise ViewpipeError("convert needs SRC and DST (or --verify DST); see `viewpipe convert --help`")
    if args.workers < 1 or args.shard_size < 1 or not 1 <= args.jpeg_quality <= 100:
        raise ViewpipeError("--workers and --shard-size must be >= 1 and --jpeg-quality in 1..100")
    formats = ("ffcv", "dali") if args.format == "both" else (args.format,)
    try:
        report = convert(args.src, args.dst, formats, args.workers, args.split, args.max_side, args.max_pixels,
                         args.ffcv_mode, args.jpeg_quality, args.shard_size, args.resume)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
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
