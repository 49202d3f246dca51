"""The FFCV file (`data.beton`): written through ffcv's DatasetWriter in a supervised child process
(`write_beton`), and the checksums of the image bytes it stores (`beton_checksums`).

The rule: ffcv waits forever on a writer worker that failed (an allocation larger than its page, a full disk, a
source file gone), so the child and each of its workers report to this process, which ends the stage at once
with one line when any of them fails or dies, stops the rest, and renames the file into place only when all
finished. Pages are sized to hold the largest sample; the free space is checked before writing.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from viewpipe.errors import UnreadableFileError, ViewpipeError, import_optional
from viewpipe.formats import BETON, CHECKSUM_DTYPE, open_image
from viewpipe.sources import Source
from viewpipe.workers import children_of, describe_death, die_with_parent, exit_reason, proc_state


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


def _check_beton_space(dst: Path, hw: np.ndarray, mode: str, n_workers: int, page_size: int) -> None:
    """Refuse to start without the space the FFCV file needs, an estimate: the raw pixels, an eighth of them
    for JPEG (about what quality 90 takes), and the part-filled last page of each worker."""
    need = int((hw[:, 0].astype(np.int64) * hw[:, 1] * 3).sum() // (8 if mode == "jpg" else 1)) + n_workers * page_size
    free = shutil.disk_usage(dst).free
    if need > free:
        raise ViewpipeError(f"{dst}: about {need / 2**30:.1f} GiB needed for {BETON}, {free / 2**30:.1f} GiB free; "
                            "free space (or use --ffcv-mode jpg / --max-side) and rerun with --resume")


def write_beton(source: Source, dst: Path, ids: np.ndarray, labels: np.ndarray, hw: np.ndarray, workers: int,
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
                                           f"{exit_reason(self.child.exitcode)} (out of memory? killed?); rerun with "
                                           "--resume", None, "")
                return
            for pid in sorted(self.started - self.done) if not self.ok else []:
                if proc_state(pid)[0] in ("", "Z", "X", "x"):  # gone: said done before, or died
                    self.drain(0)
                    if pid not in self.done and self.error is None:
                        self.error = ("error", f"{self.dst / BETON}: one of ffcv's writer processes (pid {pid}) "
                                               f"{describe_death(pid)} (out of memory? killed?); rerun with --resume",
                                      None, "")

    def stop(self) -> None:
        """Failed or interrupted: stop the child, which stops its workers and frees ffcv's memory (its workers
        killed if it does not stop within 5 s); the pipe closed."""
        child = self.child
        if child.is_alive():
            grandchildren = set(children_of(child.pid)) | self.started
            os.kill(child.pid, signal.SIGTERM)
            child.join(5)
            if child.is_alive():
                for pid in grandchildren - self.done:
                    if proc_state(pid)[0] not in ("", "Z"):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                child.kill()
                child.join(5)
        self.pipe.close()


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

    die_with_parent(_WRITER_PARENT)
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


def _abort(signum: int, frame: Any) -> None:  # noqa: ARG001
    """The writer child's SIGTERM: stop writing (once)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Abort


def _beton_child(conn, parent: int, source: Source, ids: np.ndarray, labels: np.ndarray, tmp: str,  # noqa: ANN001
                 fields_args: dict, workers: int, page_size: int) -> None:
    """The writer child: runs ffcv's DatasetWriter (whose workers are its children) and tells the supervisor
    "ok" or the error; SIGTERM from the supervisor stops it and its workers."""
    global _MSG, _WRITER_PARENT
    die_with_parent(parent)
    _MSG, _WRITER_PARENT = conn, os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops this child
    signal.signal(signal.SIGTERM, _abort)
    code = 1
    try:
        _write_with_ffcv(source, ids, labels, tmp, fields_args, workers, page_size)
        _send(("ok",))
        code = 0
    except _Abort:
        pass
    except BaseException as exc:  # noqa: BLE001
        _send(_failure(exc, f"{BETON}: ffcv's writer failed"))
    finally:
        _end_writer_child(code)


def _write_with_ffcv(source: Source, ids: np.ndarray, labels: np.ndarray, tmp: str, fields_args: dict,
                     workers: int, page_size: int) -> None:
    """ffcv's DatasetWriter over the samples `ids` into `tmp`, its workers forked from this process and each
    run through `_ffcv_worker`; its shared memory never named in /dev/shm for longer than its set-up."""
    import multiprocessing as mp
    from functools import partial

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


def _end_writer_child(code: int) -> None:
    """The writer child's end: its workers joined (after success: they have handed in their allocations) or
    killed (after a failure: they wait on each other), then exit with `code`."""
    import multiprocessing as mp

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


def beton_checksums(path: Path, n: int, reader: Any = None) -> np.ndarray:
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
