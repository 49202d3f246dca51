"""`convert`: an ImageNet-style folder (or a `.npz` JPEG collection) to DALI WebDataset shards and an FFCV
`.beton`, with an index, a report of every skipped file, and resuming after an interruption (`resume=True`);
`viewpipe.tools.convert` is its command line. Imports no torch.

Stages, each resumable: list the files; probe each one in parallel (read, header, a full decode; the results
journaled in chunks); write the DALI shards (each complete once its index file exists); write the FFCV file
(`viewpipe.beton`: temporary name, renamed at the end); then the index, the classes and the report, the report
last — a folder whose `convert_report.json` says `"complete": true` is a finished dataset, anything else is
not. The workers are `viewpipe.workers`'; the checks of a finished dataset are `viewpipe.verify`'s (`verify`
and `Damaged` re-exported here).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from viewpipe.beton import beton_checksums, write_beton
from viewpipe.errors import UnreadableFileError, ViewpipeError, import_optional
from viewpipe.formats import (
    BETON, CHECKSUM_DTYPE, DEFAULT_MAX_PIXELS, FFCV_MAX_SIDE, REPORT, DatasetIndex, Probe, ShardWriter, probe,
    sample_checksum, shard_bytes, shard_paths, write_atomic,
)
from viewpipe.sources import FolderSource, NpzSource, Source
from viewpipe.verify import Damaged, verify
from viewpipe.workers import Workers, progress

__all__ = ["CHUNK", "NO_SPACE", "WORK", "Damaged", "convert", "default_max_side", "open_convert_source", "verify"]

WORK = ".work"
CHUNK = 4096  # files per journaled probe chunk
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # errnos of a full disk (or quota, or file-size limit)


# ---------------------------------------------------------------------------- worker side
_SOURCE: Source | None = None  # the source a probe or shard worker reads (`_use_source`)


def _use_source(source: Source) -> None:
    """A probe or shard worker's start: the source its items (`_probe_item`, `_shard_item`) read from."""
    global _SOURCE
    _SOURCE = source


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


def default_max_side(formats: tuple[str, ...] | list[str]) -> int:
    """The `max_side` of a new conversion into `formats` when none is given: `FFCV_MAX_SIDE` when it writes an
    FFCV file (with DALI shards too: one index holds one size per sample, which every backend crops from), else
    0, natural size."""
    return FFCV_MAX_SIDE if "ffcv" in formats else 0


def _started_max_side(dst: Path, read_report: Callable[[], Any]) -> int | None:
    """The max_side a conversion into `dst` was started (or finished) with, None if there is none: its report's
    (`read_report()`, the parsed `dst/convert_report.json`), else its listing's."""
    for read in (read_report, lambda: json.loads((dst / WORK / "listing.json").read_text())):
        try:
            return int(read()["options"]["max_side"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    formats: tuple[str, ...] = ("ffcv", "dali"),
    workers: int = 1,
    split: str = "train",
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ffcv_mode: str = "jpg",
    jpeg_quality: int = 90,
    shard_size: int = 10_000,
    resume: bool = False,
) -> dict:
    """Convert `src` into `dst`; returns the report (also written to `dst/convert_report.json`).

    `max_side`: downscale images whose longer side exceeds it (0: keep natural size); None: the side the
    resumed conversion was started with, else `default_max_side(formats)` (500 with FFCV, else natural)."""
    src, dst = Path(src), Path(dst)
    # --resume reads the report for max_side and for whether it is finished: parse it once (a failed read or
    # parse is not cached: it fails again, as it did, where it is read next)
    read_report = functools.cache(lambda: json.loads((dst / REPORT).read_text()))
    max_side = _resolved_max_side(dst, max_side, formats, resume, read_report)
    t0 = time.perf_counter()
    source = open_convert_source(src, split)
    options = {"formats": sorted(formats), "split": split, "max_side": max_side, "max_pixels": max_pixels,
               "ffcv_mode": ffcv_mode, "jpeg_quality": jpeg_quality, "shard_size": shard_size}
    work = dst / WORK
    if resume and (dst / REPORT).exists() and read_report().get("complete"):
        if read_report()["options"] != options:
            raise ViewpipeError(f"{dst}: already finished with other options ({read_report()['options']})")
        return read_report()  # nothing left to do
    _prepare(src, dst, work, source, options, resume)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    records = _probe_all(source, work, workers, max_pixels, max_side)  # 1. probe every file, journaled in chunks
    stages["probe"] = time.perf_counter() - t
    ids = np.flatnonzero(np.array([not r[4] for r in records], dtype=bool))
    if len(ids) == 0:
        _write_report(dst, src, source, records, options, t0, complete=False)
        raise ViewpipeError(f"{src}: none of its {len(source)} files could be converted; the reasons are in {dst / REPORT}")
    index = _write_formats(source, dst, ids, records, options, workers, stages)  # 2. shards, 3. FFCV
    index.save(dst)  # 4. index, classes, report (last)
    report = _write_report(dst, src, source, records, options, t0, complete=True, stages=stages)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _resolved_max_side(dst: Path, max_side: int | None, formats: tuple[str, ...], resume: bool,
                       read_report: Callable[[], dict]) -> int:
    """`max_side` as given, else the resumed conversion's, else the formats' default; refused below 0."""
    if max_side is None:
        max_side = _started_max_side(dst, read_report) if resume else None
        max_side = default_max_side(formats) if max_side is None else max_side
    if max_side < 0:
        raise ViewpipeError(f"max_side must be 0 (keep natural size) or a positive side in pixels, got {max_side}")
    return max_side


def _write_formats(source: Source, dst: Path, ids: np.ndarray, records: list, options: dict, workers: int,
                   stages: dict[str, float]) -> DatasetIndex:
    """The usable samples `ids` written in each format asked for (DALI shards, the FFCV file unless an earlier
    run finished it), with the time of each stage in `stages`; returns the dataset's index."""
    formats, n, labels = options["formats"], len(ids), source.labels[ids]
    hw = np.array([records[i][:2] for i in ids], dtype=np.int32).reshape(-1, 2)  # after any downscale
    shards, offsets = np.full(n, -1, np.int32), np.zeros(n, np.int64)
    nbytes, checksums = np.zeros(n, np.int64), np.zeros(n, CHECKSUM_DTYPE)
    if "dali" in formats:
        t = time.perf_counter()
        _write_shards(source, dst, ids, labels, records, workers, options["jpeg_quality"], options["shard_size"],
                      shards, offsets, nbytes, checksums)
        stages["dali"] = time.perf_counter() - t
    if "ffcv" in formats and not (dst / BETON).exists():
        t = time.perf_counter()
        import_optional("ffcv.writer", "ffcv", "FFCV")  # about 6 s: ffcv compiles numba code on import
        stages["ffcv_import"] = time.perf_counter() - t
        t = time.perf_counter()
        write_beton(source, dst, ids, labels, hw, workers, options["max_side"], options["ffcv_mode"],
                    options["jpeg_quality"])
        stages["ffcv"] = time.perf_counter() - t
    ffcv_checksums = None
    if "ffcv" in formats:  # of the bytes ffcv stored (also when the file was finished by an earlier run)
        t = time.perf_counter()
        import_optional("ffcv.reader", "ffcv", "FFCV")
        ffcv_checksums = beton_checksums(dst / BETON, n)
        stages["ffcv_checksums"] = time.perf_counter() - t
    return DatasetIndex(labels=labels.astype(np.int64), heights=hw[:, 0], widths=hw[:, 1],
                        sources=np.array([source.describe(int(i)).encode() for i in ids], dtype=np.bytes_),
                        shards=shards, offsets=offsets, nbytes=nbytes, classes=list(source.classes),
                        checksums=checksums if "dali" in formats else None, ffcv_checksums=ffcv_checksums)


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
    bar = progress(iter(()), len(source), "probe")
    bar.update(done_files)
    if todo:
        with Workers(workers, "probe", _use_source, (source,)) as pool:
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
                  nbytes: np.ndarray, checksums: np.ndarray) -> None:
    n = len(ids)
    (dst / "wds").mkdir(exist_ok=True)
    bar = progress(iter(()), n, "dali shards", "img")
    with Workers(workers, "shard", _use_source, (source,)) as pool:
        for s in range(-(-n // shard_size)):
            lo, hi = s * shard_size, min((s + 1) * shard_size, n)
            tar_path, idx_path = shard_paths(dst, s)
            shards[lo:hi] = s
            if idx_path.exists():  # complete from an earlier run: read its offsets back
                _offsets_from_index(idx_path, offsets[lo:hi], nbytes[lo:hi])
                _checksums_from_shard(tar_path, offsets[lo:hi], nbytes[lo:hi], checksums[lo:hi])
                bar.update(hi - lo)
                continue
            writer = ShardWriter(tar_path, idx_path)
            items = [(int(ids[k]), records[ids[k]], quality) for k in range(lo, hi)]
            for k, data in zip(range(lo, hi), pool.imap(_shard_item, items, chunksize=8)):
                writer.add(k, int(labels[k]), data, records[ids[k]][2])
                nbytes[k] = len(data)
                checksums[k] = sample_checksum(data)
                bar.update(1)
            writer.close()
            offsets[lo:hi] = writer.offsets
    bar.close()


def _checksums_from_shard(tar_path: Path, offsets: np.ndarray, nbytes: np.ndarray, out: np.ndarray) -> None:
    with open(tar_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for k, (off, size) in enumerate(zip(offsets.tolist(), nbytes.tolist())):
            out[k] = sample_checksum(mm[off : off + size])


def _offsets_from_index(idx_path: Path, offsets: np.ndarray, nbytes: np.ndarray) -> None:
    lines = idx_path.read_text().splitlines()[1:]
    for k, line in enumerate(lines):
        _, off, size, *_ = line.split()
        offsets[k], nbytes[k] = int(off), int(size)


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
        # links to a folder already listed in the same class (e.g. a loop, cls/self -> .): not followed again
        "repeated_folders": getattr(source, "repeated_folders", []),
        "seconds": round(seconds, 3), "files_per_s": round(seen / seconds, 1) if seconds > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in (stages or {}).items()},  # this run's (not resumed) stages
    }
    _write_json(dst / REPORT, report)
    return report
