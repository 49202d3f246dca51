"""The conversion library behind `viewpipe convert` (`viewpipe.tools.convert` is its command line): an
ImageNet-style folder (or a `.npz` JPEG collection) to DALI WebDataset shards and an FFCV `.beton`, with an
index, a report of every skipped file, resuming after an interruption (`convert(..., resume=True)`) and
`verify`.

Stages, each resumable: list the files; probe each one in parallel (read, header, a full decode; the results
are journaled in chunks); write the DALI shards (each complete once its index file exists); write the FFCV
file (temporary name, renamed at the end); then the index, the classes and the report, the report last — a
folder whose `convert_report.json` says `"complete": true` is a finished dataset, anything else is not.

Nothing hangs and nothing is left running: the workers (`_Workers`, and ffcv's writer run in a supervised child
process) die with the command (PR_SET_PDEATHSIG on Linux); a worker that fails or dies ends the stage with one
line; shutting workers down is bounded. The index stores a checksum of every sample's bytes (shards and FFCV
file), which `--verify` checks, naming each damaged sample.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import mmap
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from viewpipe.errors import UnreadableFileError, ViewpipeError, import_optional
from viewpipe.formats import (
    BETON, CHECKSUM_DTYPE, DEFAULT_MAX_PIXELS, FFCV_MAX_SIDE, REPORT, DatasetIndex, Probe, ShardWriter, open_image,
    probe, sample_checksum, shard_bytes, shard_paths, write_atomic,
)
from viewpipe.sources import FolderSource, NpzSource, Source

WORK = ".work"
CHUNK = 4096  # files per journaled probe chunk
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # errnos of a full disk (or quota, or file-size limit)


# ---------------------------------------------------------------------------- worker side
_SOURCE: Source | None = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (kill -9 of `convert` leaves no
    worker behind); exit at once if the parent is already gone. Elsewhere only the second part."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(source: Source, parent: int) -> None:
    global _SOURCE
    _SOURCE = source
    _die_with_parent(parent)
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


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it survives a pickle round trip (to be re-raised in the main process), else a plain stand-in."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(conn, source: Source, parent: int) -> None:  # noqa: ANN001  (multiprocessing Connection)
    """One worker of `_Workers`: run the chunks it is sent, answer each with (True, results) or (False, error)."""
    _init_worker(source, parent)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        fn, chunk = msg
        try:
            out: tuple = (True, [fn(a) for a in chunk])
        except Exception as exc:  # noqa: BLE001  re-raised in the main process
            out = (False, _picklable(exc))
        try:
            conn.send(out)
        except (BrokenPipeError, EOFError, OSError):
            break


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Workers:
    """Worker processes for the probe and shard stages (multiprocessing.Pool's replacement): `imap` gives results
    in order, re-raises a worker's error, and turns a worker that dies (kill -9, out of memory) into one
    `ViewpipeError` instead of waiting forever as Pool does; closing can never hang (a bounded join, then
    SIGKILL, then a bounded join: Pool.terminate deadlocked on a full disk). Workers die with the main process."""

    def __init__(self, workers: int, source: Source, stage: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.stage = stage
        self.procs: list = []
        self.conns: list = []
        try:
            for _ in range(max(1, workers)):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(theirs, source, os.getpid()), daemon=True,
                                   name=f"viewpipe-{stage}")
                proc.start()
                theirs.close()  # only the worker holds its end: its death reads as EOF here
                self.procs.append(proc)
                self.conns.append(mine)
        except BaseException:
            self.close(graceful=False)
            raise

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self.close(graceful=exc_type is None)

    def _recv(self, w: int) -> tuple[bool, Any]:
        conn, proc = self.conns[w], self.procs[w]
        while True:
            try:
                if conn.poll(0.5):
                    return conn.recv()
            except (EOFError, OSError):
                proc.join(1)
            if not proc.is_alive():
                raise self._died(w)

    def _died(self, w: int) -> ViewpipeError:
        """The one-line error for worker `w`, which died."""
        proc = self.procs[w]
        proc.join(1)
        return ViewpipeError(f"a {self.stage} worker process (pid {proc.pid}) {_exit_reason(proc.exitcode)}"
                             " (out of memory? killed?); rerun with --resume")

    def _send(self, w: int, msg: tuple) -> None:
        """Send worker `w` a chunk; a worker that died meanwhile (its pipe broken) is the same one-line error
        as when it dies while working, not the pipe's error."""
        try:
            self.conns[w].send(msg)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(w) from None

    def imap(self, fn: Callable[[Any], Any], items: list, chunksize: int = 16) -> Iterator[Any]:
        """fn(item) for every item, in order; chunks go round-robin, at most two queued per worker."""
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        n_workers = len(self.procs)
        ahead = 2 * n_workers
        for j in range(min(ahead, len(chunks))):
            self._send(j % n_workers, (fn, chunks[j]))
        for j in range(len(chunks)):
            ok, value = self._recv(j % n_workers)
            if j + ahead < len(chunks):
                self._send((j + ahead) % n_workers, (fn, chunks[j + ahead]))
            if not ok:
                raise value
            yield from value

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for conn in self.conns:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 2
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(2)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


# ---------------------------------------------------------------------------- FFCV writer (in a child process)
_MSG = None  # the child's and its writer workers' pipe to the supervising main process
_WRITER_PARENT = 0  # pid of the child that runs ffcv's DatasetWriter
_CURRENT: tuple[int, str] = (-1, "")  # the sample a writer worker works on: (position, source)


def _send(msg: tuple) -> None:
    """A short message to the supervisor; one write under PIPE_BUF, so several processes may send at once."""
    if _MSG is not None:
        try:
            _MSG.send(msg)
        except (OSError, ValueError):
            pass


def _failure(exc: BaseException, where: str) -> tuple:
    """("error", one-line message, errno or None, file) for the supervisor."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return ("error", f"{where}: {exc.strerror or exc}"[:1500], exc.errno, str(exc.filename or ""))
    if isinstance(exc, ViewpipeError):
        return ("error", str(exc).replace("\n", " ")[:1500], None, "")
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:600]
    return ("error", f"{where}: {text}; rerun with --resume once it is fixed"[:1500], None, "")


class _FFCVDataset:
    """The accepted samples as (RGB uint8 array, label) for ffcv's DatasetWriter (which runs it in workers)."""

    def __init__(self, source: Source, ids: np.ndarray, labels: np.ndarray) -> None:
        self.source, self.ids, self.labels = source, ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
        global _CURRENT
        i = int(self.ids[k])
        _CURRENT = (k, self.source.describe(i))
        try:
            data = self.source.read(i)
            image = np.asarray(open_image(data))
        except UnreadableFileError as exc:
            error = ViewpipeError(f"{self.source.describe(i)}: became unreadable during the conversion "
                                  f"({exc.reason}); rerun with --resume")
            _send(_failure(error, ""))  # at once: ffcv's worker may wait on its page before it dies
            raise error from None
        except Exception as exc:  # noqa: BLE001  changed since the probe: decodes no more
            error = ViewpipeError(f"{self.source.describe(i)}: changed during the conversion, it no longer reads or "
                                  f"decodes ({type(exc).__name__}: {exc}); rerun with --resume")
            _send(_failure(error, ""))
            raise error from None
        return image, int(self.labels[k])


def _ffcv_worker(*args: Any) -> None:
    """One of ffcv's writer processes (started by DatasetWriter in the writer child): ffcv's own job, with the
    process tied to its parent's life and its end (done, or the error) told to the supervisor."""
    from ffcv.writer import worker_job_indexed_dataset

    _die_with_parent(_WRITER_PARENT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _send(("start", os.getpid()))
    try:
        worker_job_indexed_dataset(*args)
        allocations = args[6]  # flush this worker's allocation table to the writer before saying done
        allocations.close()
        allocations.join_thread()
    except BaseException as exc:  # noqa: BLE001
        k, where = _CURRENT
        _send(_failure(exc, f"{BETON}: ffcv's writer failed" + (f" on sample {k} ({where})" if k >= 0 else "")))
        sys.stderr.flush()
        os._exit(1)
    _send(("done", os.getpid()))


class _Abort(BaseException):
    pass


def _beton_child(conn, parent: int, source: Source, ids: np.ndarray, labels: np.ndarray, tmp: str,  # noqa: ANN001
                 fields_args: dict, workers: int, page_size: int) -> None:
    """The writer child: runs ffcv's DatasetWriter (whose workers are its children) and tells the supervisor
    "ok" or the error; SIGTERM from the supervisor stops it and its workers."""
    import multiprocessing as mp
    from functools import partial

    global _MSG, _WRITER_PARENT
    _die_with_parent(parent)
    _MSG, _WRITER_PARENT = conn, os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops this child

    def abort(signum: int, frame: Any) -> None:  # noqa: ARG001
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Abort

    signal.signal(signal.SIGTERM, abort)
    code = 1
    try:
        import ffcv.writer as fw
        from ffcv.fields import IntField, RGBImageField
        from tqdm import tqdm

        mp.set_start_method("fork", force=True)  # ffcv's workers must be this process's own children
        fw.tqdm = partial(tqdm, disable=None, desc="ffcv", unit="img")  # no bar where stderr is not a terminal
        class Writer(fw.DatasetWriter):
            def prepare(self) -> None:
                super().prepare()
                # ffcv's workers are forked from here and inherit the shared memory's mapping: its name is not
                # needed, so remove it now, and nothing (kill -9 included) can leave it behind in /dev/shm
                shm = self.metadata_sm
                shm.unlink()  # (also unregisters it from multiprocessing's resource tracker)
                shm.unlink = lambda: None  # ffcv unlinks it again when it finishes

        fields = {"image": RGBImageField(**fields_args), "label": IntField()}
        writer = Writer(tmp, fields, page_size=page_size, num_workers=workers)
        # from_indexed_dataset(dataset, chunksize=64), with _ffcv_worker around ffcv's worker job
        dataset = _FFCVDataset(source, ids, labels)
        writer._write_common(len(dataset), fw.chunks(list(enumerate(range(len(dataset)))), 64), _ffcv_worker,
                             (dataset,))
        _send(("ok",))
        code = 0
    except _Abort:
        pass
    except BaseException as exc:  # noqa: BLE001
        _send(_failure(exc, f"{BETON}: ffcv's writer failed"))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if code == 0:  # ffcv's workers have handed in their allocations: let them exit
            deadline = time.monotonic() + 5
            for child in mp.active_children():
                child.join(max(0.0, deadline - time.monotonic()))
        for child in mp.active_children():  # when it failed: ffcv's workers wait on each other, stop them
            child.kill()
        for child in mp.active_children():
            child.join(2)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


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


def _progress(it: Iterator, total: int, desc: str, unit: str = "file") -> Iterator:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, smoothing=0.1, disable=None)


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
    src: Path,
    dst: Path,
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
        _write_beton(source, dst, ids, labels, hw, workers, options["max_side"], options["ffcv_mode"],
                     options["jpeg_quality"])
        stages["ffcv"] = time.perf_counter() - t
    ffcv_checksums = None
    if "ffcv" in formats:  # of the bytes ffcv stored (also when the file was finished by an earlier run)
        t = time.perf_counter()
        import_optional("ffcv.reader", "ffcv", "FFCV")
        ffcv_checksums = _beton_checksums(dst / BETON, n)
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
    bar = _progress(iter(()), len(source), "probe")
    bar.update(done_files)
    if todo:
        with _Workers(workers, source, "probe") as pool:
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
    bar = _progress(iter(()), n, "dali shards", "img")
    with _Workers(workers, source, "shard") as pool:
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


_FFCV_MIN_PAGE = 1 << 23  # ffcv's default page size (8 MiB)
_FFCV_MAX_PAGE = 1 << 31  # ffcv needs < 2**32; a page is held in memory by each of its workers


def _ffcv_page_size(hw: np.ndarray) -> int:
    """A page size (a power of two) that holds the largest sample: ffcv cannot split a sample across pages, and
    its default (8 MiB) fails on a 48-megapixel JPEG. Bound: the raw pixels (what raw mode stores; JPEG at any
    quality stays under them: 0.66 of them at quality 100 for noise) plus 1 MiB."""
    largest = int((hw[:, 0].astype(np.int64) * hw[:, 1] * 3).max()) + (1 << 20) if len(hw) else 0
    page = _FFCV_MIN_PAGE
    while page < largest:
        page *= 2
    if page > _FFCV_MAX_PAGE:
        raise ViewpipeError(f"the largest image ({largest >> 20} MiB of pixels) is too large for an FFCV page "
                            f"(at most {_FFCV_MAX_PAGE >> 20} MiB); lower --max-pixels or use --max-side")
    return page


def _proc_state(pid: int) -> tuple[str, int | None]:
    """(state letter, wait status if a zombie) of a process from /proc; ("", None) when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        if not os.path.isdir("/proc/self"):  # no /proc: ask the kernel whether it exists
            try:
                os.kill(pid, 0)
                return "?", None
            except ProcessLookupError:
                return "", None
            except PermissionError:
                return "?", None
        return "", None
    status = int(fields[49]) if len(fields) > 49 and fields[49].lstrip("-").isdigit() else None
    return fields[0], status


def _describe_death(pid: int) -> str:
    state, status = _proc_state(pid)
    if state == "Z" and status is not None:
        return _exit_reason(-(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF)
    return "died"


def _children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _write_beton(source: Source, dst: Path, ids: np.ndarray, labels: np.ndarray, hw: np.ndarray, workers: int,
                 max_side: int, mode: str, quality: int) -> None:
    """Write the FFCV file through ffcv's DatasetWriter, run in a child process that this one supervises: ffcv
    waits forever on a writer worker that failed (an allocation larger than its page, a full disk, a source
    file gone), so every failure of the child or of one of its workers ends the stage at once with one line,
    the child and its workers stopped (and they die with this process if it is killed)."""
    import multiprocessing as mp

    import_optional("ffcv", "ffcv", "FFCV")
    tmp = dst / (BETON + ".tmp")
    tmp.unlink(missing_ok=True)
    page_size, n_workers = _ffcv_page_size(hw), max(1, workers)
    _check_beton_space(dst, hw, mode, n_workers, page_size)
    fields_args = {"write_mode": mode, "max_resolution": max_side or None, "jpeg_quality": quality}
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_beton_child, name="viewpipe-ffcv", daemon=False,
                        args=(theirs, os.getpid(), source, ids, labels, str(tmp), fields_args, n_workers, page_size))
    child.start()
    theirs.close()
    watch = _BetonWatch(child, mine, dst)
    try:
        watch.run()
    finally:
        watch.stop()
    if watch.error is not None:
        _, text, code, filename = watch.error
        if code is not None:
            raise OSError(code, os.strerror(code), filename or str(tmp))
        raise ViewpipeError(text)
    os.replace(tmp, dst / BETON)


def _check_beton_space(dst: Path, hw: np.ndarray, mode: str, n_workers: int, page_size: int) -> None:
    """Refuse to start without the space the FFCV file needs, an estimate: the raw pixels, an eighth of them
    for JPEG (about what quality 90 takes), and the part-filled last page of each worker."""
    need = int((hw[:, 0].astype(np.int64) * hw[:, 1] * 3).sum() // (8 if mode == "jpg" else 1)) + n_workers * page_size
    free = shutil.disk_usage(dst).free
    if need > free:
        raise ViewpipeError(f"{dst}: about {need / 2**30:.1f} GiB needed for {BETON}, {free / 2**30:.1f} GiB free; "
                            "free space (or use --ffcv-mode jpg / --max-side) and rerun with --resume")


class _BetonWatch:
    """The FFCV writer child as this process watches it: the messages it sends (its workers started and done,
    ok, the first error), and a one-line error when the child or one of its workers dies without one."""

    def __init__(self, child: Any, pipe: Any, dst: Path) -> None:
        self.child, self.pipe, self.dst = child, pipe, dst
        self.started: set[int] = set()
        self.done: set[int] = set()
        self.error: tuple | None = None
        self.ok = False

    def drain(self, timeout: float) -> None:
        """Read the messages waiting (the first after up to `timeout` seconds)."""
        while self.pipe.poll(timeout):
            timeout = 0
            try:
                msg = self.pipe.recv()
            except (EOFError, OSError):
                return
            if msg[0] in ("start", "done"):
                (self.started if msg[0] == "start" else self.done).add(msg[1])
            elif msg[0] == "ok":
                self.ok = True
            elif msg[0] == "error" and self.error is None:
                self.error = msg

    def run(self) -> None:
        """Until the child ends or fails: its messages, its exit, and each started worker still alive."""
        while self.error is None:
            self.drain(0.2)
            if self.error is not None:
                return
            if not self.child.is_alive():
                self.child.join()
                self.drain(0)
                if self.error is None and not (self.ok and self.child.exitcode == 0):
                    self.error = ("error", f"{self.dst / BETON}: ffcv's writer process "
                                           f"{_exit_reason(self.child.exitcode)} (out of memory? killed?); rerun with "
                                           "--resume", None, "")
                return
            for pid in sorted(self.started - self.done) if not self.ok else []:
                if _proc_state(pid)[0] in ("", "Z", "X", "x"):  # gone: said done before, or died
                    self.drain(0)
                    if pid not in self.done and self.error is None:
                        self.error = ("error", f"{self.dst / BETON}: one of ffcv's writer processes (pid {pid}) "
                                               f"{_describe_death(pid)} (out of memory? killed?); rerun with --resume",
                                      None, "")

    def stop(self) -> None:
        """Failed or interrupted: stop the child, which stops its workers and frees ffcv's memory (its workers
        killed if it does not stop within 5 s); the pipe closed."""
        child = self.child
        if child.is_alive():
            grandchildren = set(_children_of(child.pid)) | self.started
            os.kill(child.pid, signal.SIGTERM)
            child.join(5)
            if child.is_alive():
                for pid in grandchildren - self.done:
                    if _proc_state(pid)[0] not in ("", "Z"):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                child.kill()
                child.join(5)
        self.pipe.close()


def _beton_checksums(path: Path, n: int, reader: Any = None) -> np.ndarray:
    """sample_checksum of each sample's stored image bytes in an FFCV file, from its allocation table (the
    image is the only field ffcv stores outside the metadata; a sample's allocations in table order).
    `reader`: the file's ffcv `Reader` when the caller has one (its tables are not read again)."""
    if reader is None:
        from ffcv.reader import Reader

        reader = Reader(str(path))
    table = reader.alloc_table
    if reader.num_samples != n:
        raise ViewpipeError(f"{path}: holds {reader.num_samples} samples, the index {n}; convert again")
    import zlib

    out = np.zeros(n, CHECKSUM_DTYPE)
    order = np.argsort(table["sample_id"], kind="stable")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        crc: dict[int, int] = {}
        for row in table[order]:
            k, ptr, size = int(row["sample_id"]), int(row["ptr"]), int(row["size"])
            if k >= n or ptr + size > len(mm):
                raise ViewpipeError(f"{path}: its allocation table points outside the file; convert again")
            crc[k] = zlib.crc32(mm[ptr : ptr + size], crc.get(k, 0))
    for k, v in crc.items():
        out[k] = v & 0xFFFFFFFF
    return out


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


# ---------------------------------------------------------------------------- verification
class Damaged(ViewpipeError):
    """`verify` found damage: `problems` holds one line per damaged sample (or shard, or file)."""

    def __init__(self, dst: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{dst}: {len(problems)} damaged samples or files (each named above); convert again")


def verify(dst: Path) -> dict:
    """Re-read everything a conversion wrote and check it: counts, labels, sizes, and every sample's bytes
    against the checksums the conversion stored (indexes written before checksums: a full decode instead).
    Raises `Damaged`, naming every damaged sample (index, source, shard or file), or returns the counts."""
    report_path = dst / REPORT
    if not report_path.exists() or not json.loads(report_path.read_text()).get("complete"):
        raise ViewpipeError(f"{dst}: not a finished conversion (no complete {REPORT}); run or resume `viewpipe convert`")
    report = json.loads(report_path.read_text())
    index = DatasetIndex.load(dst)
    n = len(index)
    if report["samples_written"] != n:
        raise ViewpipeError(f"{dst}: the report says {report['samples_written']} samples but the index has {n}")
    out: dict[str, Any] = {"samples": n}
    problems: list[str] = []
    if "dali" in report["options"]["formats"]:
        out["dali"] = _verify_shards(dst, index, problems)
    if "ffcv" in report["options"]["formats"]:
        out["ffcv"] = _verify_beton(dst, index, problems)
    if problems:
        raise Damaged(dst, problems)
    return out


def _sample_name(index: DatasetIndex, k: int, shard: bool = False) -> str:
    """"sample K (its shard key, from its source file)": what --verify names a damaged sample by."""
    key = f"{k:09d}, " if shard else ""
    return f"sample {k} ({key}from {index.sources[k].decode(errors='replace')})"


def _tar_header(mm: mmap.mmap, off: int) -> tuple[str, int] | None:
    """(name, size) of the ustar header in the 512 bytes before a member's data, None if it is damaged."""
    import tarfile

    if off < tarfile.BLOCKSIZE or off > len(mm):
        return None
    block = mm[off - tarfile.BLOCKSIZE : off]
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return None
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):  # the checksum field counts as spaces
        return None
    return block[:100].split(b"\0", 1)[0].decode(errors="replace"), size


def _verify_shards(dst: Path, index: DatasetIndex, problems: list[str]) -> int:
    """Every sample of every shard, through its DALI index lines (as DALI reads them): the tar headers, the
    .meta and .cls members, the offsets, and the image bytes' checksum (or a decode for an old index)."""
    seen = 0
    for s in _progress(iter(sorted(set(index.shards.tolist()))), None, "verify dali", "shard"):  # type: ignore[arg-type]
        tar_path, idx_path = shard_paths(dst, s)
        rows = np.flatnonzero(index.shards == s)
        span = f"samples {rows[0]}..{rows[-1]}" if len(rows) > 1 else f"sample {rows[0]}"
        try:
            lines = idx_path.read_text().splitlines()
            f = open(tar_path, "rb")
        except (OSError, UnicodeDecodeError) as exc:
            what = getattr(exc, "strerror", None) or exc
            problems.append(f"{getattr(exc, 'filename', None) or idx_path}: cannot read the shard ({what}); "
                            f"{span} lost; convert again")
            continue
        if not lines or lines[0] != f"v1.2 {len(rows)}" or len(lines) != len(rows) + 1:
            problems.append(f"{idx_path}: expected 'v1.2 {len(rows)}' and {len(rows)} lines, found "
                            f"{(lines or [''])[0][:40]!r} and {max(0, len(lines) - 1)}; {span} unreadable; convert again")
            f.close()
            continue
        with f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
            for k, line in zip(rows.tolist(), lines[1:]):
                problem = _check_shard_sample(mm, index, k, line)  # type: ignore[arg-type]
                if problem:
                    problems.append(f"{tar_path}: {_sample_name(index, k, shard=True)} {problem}; convert again")
                seen += 1
            if isinstance(mm, mmap.mmap):
                mm.close()
    if seen != len(index) and not problems:  # (a lost or damaged shard is named above)
        problems.append(f"{dst}: the shards hold {seen} samples, the index {len(index)}; convert again")
    return seen


def _check_shard_sample(mm: mmap.mmap, index: DatasetIndex, k: int, line: str) -> str:
    """What is wrong with sample k of a shard (empty if nothing): its index line, tar headers, members, bytes."""
    key = f"{k:09d}"
    parts = line.split()
    if len(parts) % 4 or not parts:
        return f"has a damaged index line ({line[:60]!r})"
    members: dict[str, bytes] = {}
    for j in range(0, len(parts), 4):
        ext, off_s, size_s, name = parts[j : j + 4]
        if not (off_s.isdigit() and size_s.isdigit()):
            return f"has a damaged index line ({line[:60]!r})"
        off, size = int(off_s), int(size_s)
        if name != f"{key}.{ext}":
            return f"is indexed as {name!r}, expected {key}.{ext}"
        if off + size > len(mm):
            return f"is cut short: .{ext} ends at byte {off + size}, the shard has {len(mm)}"
        header = _tar_header(mm, off)
        if header is None:
            return f"has a damaged tar header before its .{ext} (byte {off - 512})"
        if header != (name, size):
            return f"has a tar header for {header[0]!r} ({header[1]} bytes) where {name} ({size} bytes) should be"
        members[ext] = mm[off : off + size]
    image_ext = next((e for e in ("jpg", "png") if e in members), None)
    if image_ext is None or "meta" not in members or "cls" not in members:
        return f"lacks members (has {', '.join(sorted(members))})"
    image = members[image_ext]
    at = parts.index(image_ext)
    if (int(parts[at + 1]), len(image)) != (index.offsets[k], index.nbytes[k]):
        return "is not where the index says"
    if len(members["meta"]) != 16:
        return f"has a damaged .meta ({len(members['meta'])} bytes)"
    meta = np.frombuffer(members["meta"], "<i8")
    try:
        cls = int(members["cls"])
    except ValueError:
        return f"has a damaged .cls ({members['cls'][:20]!r})"
    if (meta[0], meta[1], cls) != (k, index.labels[k], index.labels[k]):
        return f"carries index/label {meta.tolist()}, {cls}; the index says {k}, {index.labels[k]}"
    if index.checksums is not None:
        got = sample_checksum(image)
        if got != int(index.checksums[k]):
            return (f"has damaged image bytes (checksum {got:08x}, written {int(index.checksums[k]):08x}; "
                    f"{len(image)} bytes at byte {index.offsets[k]})")
        return ""
    try:  # an index written before checksums: decode
        img = open_image(image)
    except Exception as exc:  # noqa: BLE001
        return f"does not decode ({type(exc).__name__}: {exc})"
    if (img.height, img.width) != (index.heights[k], index.widths[k]):
        return f"decodes to {img.width}x{img.height}, the index says {index.widths[k]}x{index.heights[k]}"
    return ""


def _verify_beton(dst: Path, index: DatasetIndex, problems: list[str]) -> int:
    import_optional("ffcv", "ffcv", "FFCV")
    from ffcv.reader import Reader

    path = dst / BETON
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        reader = Reader(str(path))
    except Exception as exc:  # noqa: BLE001  a damaged header or table can raise anything
        problems.append(f"{path}: not a readable FFCV file ({type(exc).__name__}: {exc}); convert again")
        return 0
    if reader.num_samples != len(index) or reader.field_names[:2] != ["image", "label"]:
        problems.append(f"{path}: holds {reader.num_samples} samples ({reader.field_names}), the index "
                        f"{len(index)}; convert again")
        return 0
    image = reader.metadata["f0"]  # fields are stored by position: f0 image, f1 label
    if not (np.array_equal(image["height"], index.heights) and np.array_equal(image["width"], index.widths)):
        bad = np.flatnonzero((image["height"] != index.heights) | (image["width"] != index.widths))
        problems.extend(f"{path}: {_sample_name(index, k)} is stored as {image['width'][k]}x{image['height'][k]}, "
                        f"the index says {index.widths[k]}x{index.heights[k]}; convert again" for k in bad[:100])
    if index.ffcv_checksums is None:  # an index written before checksums: decode every sample
        _decode_beton(path, index, problems)
        return len(index)
    labels = reader.metadata["f1"]
    for k in np.flatnonzero(labels != index.labels)[:100]:
        problems.append(f"{path}: {_sample_name(index, k)} carries label {labels[k]}, the index says "
                        f"{index.labels[k]}; convert again")
    try:
        got = _beton_checksums(path, len(index), reader)
    except ViewpipeError as exc:
        problems.append(str(exc))
        return 0
    table = reader.alloc_table
    ptrs = dict(zip(table["sample_id"].tolist(), table["ptr"].tolist()))
    for k in range(len(index)):
        if ptrs.get(k) != int(image["data_ptr"][k]):
            problems.append(f"{path}: {_sample_name(index, k)} has a damaged data pointer; convert again")
        elif got[k] != index.ffcv_checksums[k]:
            problems.append(f"{path}: {_sample_name(index, k)} has damaged image bytes (checksum {int(got[k]):08x}, "
                            f"written {int(index.ffcv_checksums[k]):08x}; at byte {ptrs[k]}); convert again")
    return len(index)


def _decode_beton(path: Path, index: DatasetIndex, problems: list[str]) -> None:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]})
    labels = []
    for _, lab in _progress(iter(loader), len(loader), "verify ffcv", "batch"):
        labels.append(np.asarray(lab).reshape(-1))
    got = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if not np.array_equal(got, index.labels):
        problems.append(f"{path}: labels read back differ from the index; convert again")


