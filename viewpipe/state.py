"""SampleState: per-sample tables (boxes, heatmaps, neighbours) in named shared memory.

One writer (the trainer) publishes whole tables; any number of readers in other processes (DataLoader,
DALI and FFCV workers) attach by name and read rows while training runs, so an update reaches running
loaders without restarting them — the ContrastiveCrop official code only sees new boxes because it
re-creates its workers every epoch.

Consistency: every table is double-buffered. The writer fills the inactive copy and then publishes it by
bumping the table's generation; a reader copies rows from the active copy and accepts them only if the
writer has not started refilling that copy meanwhile (a seqlock over two buffers). Readers never wait
for a writer and never see a torn row; a writer killed mid-update leaves the last published table intact.
This relies on aligned 8-byte loads and stores being atomic and stores staying in program order, as on
x86-64 (the platform DALI and FFCV run on).

Lifetime: segments live in /dev/shm as `viewpipe.<name>`. The creating process removes them at exit and on
SIGTERM (Ctrl-C reaches exit as KeyboardInterrupt). Liveness does not rest on pids, which mean nothing across
PID namespaces (containers sharing /dev/shm with `--ipc=host`): the owner holds an exclusive `flock` on the
segment file for its whole life, through an open file description of its own that is never mapped, never
handed to readers and closed in children it forks (`os.fork`; it is close-on-exec too), so a kill -9 of the
owner releases it whatever its children do. Readers attach with their own descriptors and never lock. A
segment whose lock can be taken has no live owner and is reclaimed by the next `SampleState.create` or by
`viewpipe state clean`; one whose lock is held is alive, whatever its recorded pid says. Segments made by
viewpipe versions without the lock (header word `_H_LOCKED` is 0) are alive if their pid and process start
time match a running process here and otherwise unknown: kept unless forced (`viewpipe state clean --force`),
since their owner may run in another PID namespace.
"""

from __future__ import annotations

import atexit
import fcntl
import io
import mmap
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .crop import FULL_BOX
from .errors import ViewpipeError
from .formats import write_atomic

SHM_DIR = Path(os.environ.get("VIEWPIPE_SHM_DIR", "/dev/shm"))
PREFIX = "viewpipe."
_MAGIC = int.from_bytes(b"VIEWPIP1", "little")
_LAYOUT = 1
_HEADER_BYTES = 4096
_ALIGN = 64

# Header: int64 words.
_H_MAGIC, _H_LAYOUT, _H_PID, _H_START, _H_N, _H_HEAT, _H_NEIGH, _H_VERSION, _H_EPOCH = range(9)
_H_LOCKED = 9  # 1: the owner holds an flock on the segment file for its lifetime (0 in segments made before that)
_H_TABLES = 16  # per table: generation, started, invalid rows in the last update, invalid rows in all updates
_TABLES = ("boxes", "heatmaps", "neighbours")
_UNBORN_GRACE_S = 60.0  # a segment without a header this old was abandoned during creation


def _process_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (guards against pid reuse); -1 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(pid: int, start: int) -> bool:
    """Whether pid runs here with this start time: proof of life in this PID namespace only (a pid written in
    another namespace names another process here, or none)."""
    return pid > 0 and _process_start(pid) == start


_LOCK_WAIT_S = 5.0  # a creator waits this long for probes (shared locks held for microseconds) to let go


class _OwnerLock:
    """The owner's exclusive flock on its segment, on an open file description of its own: never mapped
    (a mapping inherited by a forked worker would keep it alive), never given to readers, close-on-exec, and
    closed in children forked with `os.fork` (multiprocessing's fork start method included), so the lock lives
    exactly as long as the owning process. Closing a child's copy does not release the owner's lock: an flock
    goes when every descriptor of its open file description is closed (or on LOCK_UN, which is never used)."""

    __slots__ = ("fd", "__weakref__")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        _OWNER_LOCKS.add(self)

    def release(self) -> None:
        _OWNER_LOCKS.discard(self)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


_OWNER_LOCKS: set[_OwnerLock] = set()


def _drop_owner_locks_in_child() -> None:
    # The child's copies only: the parent's open file descriptions stay locked.
    for lock in list(_OWNER_LOCKS):
        lock.release()


os.register_at_fork(after_in_child=_drop_owner_locks_in_child)


def _take_owner_lock(fd: int, path: Path) -> None:
    """Lock a just-created segment (exclusive, for the owner's lifetime). Only a probe holding a shared lock for
    a moment can be in the way."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ViewpipeError(f"cannot lock shared segment {path}: another process keeps it locked") from None
            time.sleep(0.001)
        except OSError as exc:
            raise ViewpipeError(
                f"cannot lock shared segment {path} ({exc.strerror}); {path.parent} must support flock "
                "(/dev/shm does)"
            ) from None


def _create_exclusive(path: Path) -> int:
    """Create the segment file (it must not exist); an existing one is reclaimed only if its owner is proven
    gone, otherwise refused with the reason."""
    for _ in range(3):
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ViewpipeError(f"cannot create shared segment {path} ({exc.strerror}); is /dev/shm mounted?") from None
        seg, probe = _examine(path)
        try:
            if seg is None or (seg.stale and _remove(seg, probe) is not False):
                continue  # removed meanwhile, or its owner died after the last reclaim: try again
        finally:
            if probe >= 0:
                os.close(probe)
        if seg.alive:
            break
        if seg.stale:
            raise ViewpipeError(f"shared segment {path} already exists and its owner is gone, but {seg.error}")
        raise ViewpipeError(
            f"shared segment {path} already exists and its owner cannot be proven alive or gone "
            f"({seg.reason}); choose another name, or if that run has ended, `viewpipe state clean --force` "
            "removes it"
        )
    raise ViewpipeError(
        f"shared segment {path} already exists and its owner is alive; choose another name "
        "or stop that run (`viewpipe state list` shows owners)"
    )


def _lock_held(fd: int) -> bool:
    """Whether another open file description holds an exclusive lock on the file (its owner is alive).
    The probe takes a shared lock on the caller's own descriptor, so it never disturbs the owner's lock
    and concurrent probes do not disturb each other."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)  # the probe's own lock, on the probe's own descriptor
    return False


@dataclass(frozen=True)
class _Layout:
    n: int
    heatmap_size: int
    n_neighbours: int

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        shapes = {"boxes": ((self.n, 4), np.dtype(np.float32))}
        if self.heatmap_size:
            shapes["heatmaps"] = ((self.n, self.heatmap_size, self.heatmap_size), np.dtype(np.uint8))
        if self.n_neighbours:
            shapes["neighbours"] = ((self.n, self.n_neighbours), np.dtype(np.int32))
        return shapes

    def offsets(self) -> tuple[dict[str, tuple[int, int]], int]:
        """Byte offsets of both buffers of each table, and the total segment size."""
        pos, out = _HEADER_BYTES, {}
        for name, (shape, dtype) in self.shapes().items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            first = pos
            second = first + -(-nbytes // _ALIGN) * _ALIGN
            pos = second + -(-nbytes // _ALIGN) * _ALIGN
            out[name] = (first, second)
        return out, pos


def sanitize_boxes(boxes: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace invalid rows (non-finite, outside [0, 1], h1 <= h0 or w1 <= w0) by the full image; count them."""
    boxes = np.asarray(boxes, dtype=np.float32)
    h0, w0, h1, w1 = boxes.T
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(boxes).all(1) & (boxes >= 0).all(1) & (boxes <= 1).all(1) & (h1 > h0) & (w1 > w0)
    bad = int((~ok).sum())
    if bad:
        boxes = boxes.copy()
        boxes[~ok] = FULL_BOX
    return boxes, bad


def sanitize_neighbours(neighbours: np.ndarray, n: int, own: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Replace rows holding an index outside [0, n) by the sample's own index (`own`, default the row
    number); count them."""
    neighbours = np.asarray(neighbours, dtype=np.int32)
    ok = ((neighbours >= 0) & (neighbours < n)).all(1)
    own = np.arange(len(neighbours)) if own is None else np.asarray(own)
    return np.where(ok[:, None], neighbours, own[:, None]).astype(np.int32), int((~ok).sum())


class SampleState:
    """Named shared-memory tables, one row per sample: boxes (N×4 float32, normalised (h0, w0, h1, w1)),
    optional heatmaps (N×K×K uint8) and neighbours (N×k int32), with a version and an epoch counter.

    Create it in the trainer with `SampleState.create(n, ...)`; pass it (or its `name`) to loaders, whose
    processes `SampleState.attach(name)` (pickling does that automatically).
    """

    def __init__(self, name: str, fd: int, mm: mmap.mmap, owner: bool, lock: _OwnerLock | None = None) -> None:
        self.name = name
        self._fd = fd
        self._mm = mm
        self._owner_pid = os.getpid() if owner else -1
        self._lock = lock  # the owner's lock on its segment (None in readers)
        self._header = np.frombuffer(mm, dtype=np.int64, count=_HEADER_BYTES // 8)
        if self._header[_H_MAGIC] != _MAGIC or self._header[_H_LAYOUT] != _LAYOUT:
            raise ViewpipeError(f"shared segment {self.path} is not a viewpipe sample state (or of another version)")
        self.layout = _Layout(*(int(self._header[i]) for i in (_H_N, _H_HEAT, _H_NEIGH)))
        offsets, _ = self.layout.offsets()
        self._buffers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t, (shape, dtype) in self.layout.shapes().items():
            count = int(np.prod(shape))
            self._buffers[t] = tuple(  # type: ignore[assignment]
                np.frombuffer(mm, dtype=dtype, count=count, offset=off).reshape(shape) for off in offsets[t]
            )

    # ------------------------------------------------------------------ creation and attachment
    @classmethod
    def create(
        cls, n: int, *, name: str | None = None, heatmap_size: int = 0, neighbours: int = 0
    ) -> SampleState:
        """Create the segment (full-image boxes, zero heatmaps, each sample its own neighbour) and own it."""
        if n <= 0:
            raise ViewpipeError(f"a sample state needs at least one sample, got n={n}")
        reclaim_stale()
        name = name or f"{os.getpid()}-{secrets.token_hex(4)}"
        path = SHM_DIR / f"{PREFIX}{name}"
        layout = _Layout(int(n), int(heatmap_size), int(neighbours))
        _, size = layout.offsets()
        lock_fd = _create_exclusive(path)
        fd, lock = -1, None
        try:
            # Locked before anything else: from here on every other process sees a live owner. The lock's
            # descriptor is never mapped; the mapping gets a descriptor of its own.
            _take_owner_lock(lock_fd, path)
            lock = _OwnerLock(lock_fd)
            fd = os.open(path, os.O_RDWR)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ViewpipeError) as exc:
            path.unlink(missing_ok=True)
            if fd >= 0:
                os.close(fd)
            if lock is not None:
                lock.release()
            else:
                os.close(lock_fd)
            if isinstance(exc, ViewpipeError):
                raise
            raise ViewpipeError(
                f"cannot size shared segment {path} to {size} bytes ({exc.strerror}); free space in /dev/shm"
            ) from None
        header = np.frombuffer(mm, dtype=np.int64, count=_HEADER_BYTES // 8)
        header[_H_PID] = os.getpid()
        header[_H_START] = _process_start(os.getpid())
        header[_H_N], header[_H_HEAT], header[_H_NEIGH] = layout.n, layout.heatmap_size, layout.n_neighbours
        header[_H_LOCKED] = 1
        header[_H_LAYOUT] = _LAYOUT
        header[_H_MAGIC] = _MAGIC  # written last: a header with magic is complete
        del header
        state = cls(name, fd, mm, owner=True, lock=lock)
        for buf in state._buffers["boxes"]:
            buf[:] = FULL_BOX
        if "neighbours" in state._buffers:
            for buf in state._buffers["neighbours"]:
                buf[:] = np.arange(n, dtype=np.int32)[:, None]
        _register_owned(state)
        return state

    @classmethod
    def attach(cls, name: str) -> SampleState:
        """Attach read-only to an existing state by name (from any process)."""
        path = SHM_DIR / f"{PREFIX}{name}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ViewpipeError(
                f"no sample state named {name!r} ({path} is missing); was its trainer stopped?"
            ) from None
        size = os.fstat(fd).st_size
        if size < _HEADER_BYTES:
            os.close(fd)
            raise ViewpipeError(f"shared segment {path} is incomplete ({size} bytes); run `viewpipe state clean`")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        return cls(name, fd, mm, owner=False)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (SampleState.attach, (self.name,))

    @property
    def path(self) -> Path:
        return SHM_DIR / f"{PREFIX}{self.name}"

    @property
    def is_owner(self) -> bool:
        return self._owner_pid == os.getpid()

    def __len__(self) -> int:
        return self.layout.n

    @property
    def version(self) -> int:
        """Number of tables published so far; changes whenever any table changes."""
        return int(self._header[_H_VERSION])

    @property
    def epoch(self) -> int:
        return int(self._header[_H_EPOCH])

    def invalid_rows(self, table: str = "boxes", total: bool = False) -> int:
        """Invalid rows replaced by the fallback in the last update of `table` (or in all updates, `total`)."""
        return int(self._header[self._ctrl(table) + (3 if total else 2)])

    def has(self, table: str) -> bool:
        return table in self._buffers

    # ------------------------------------------------------------------ reading
    def _ctrl(self, table: str) -> int:
        return _H_TABLES + 4 * _TABLES.index(table)

    def read(self, table: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """A consistent copy of `rows` (all when None) of the published `table`."""
        if table not in self._buffers:
            raise ViewpipeError(f"sample state {self.name!r} has no {table} table; create it with that table enabled")
        ctrl = self._ctrl(table)
        bufs = self._buffers[table]
        sel = slice(None) if rows is None else rows
        while True:
            gen = int(self._header[ctrl])
            out = bufs[gen & 1][sel]
            if isinstance(sel, slice):
                out = out.copy()
            # The copy is good unless the writer began refilling this buffer (generation gen + 2) meanwhile.
            if int(self._header[ctrl + 1]) <= gen + 1:
                return out

    def boxes(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        return self.read("boxes", rows)

    def heatmaps(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        return self.read("heatmaps", rows)

    def neighbours(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        return self.read("neighbours", rows)

    # ------------------------------------------------------------------ writing (owner only)
    def _publish(self, table: str, values: np.ndarray, rows: np.ndarray | None, invalid: int) -> None:
        if not self.is_owner:
            raise ViewpipeError(f"sample state {self.name!r} is read-only in this process; only its creator writes")
        ctrl = self._ctrl(table)
        gen = int(self._header[ctrl])
        active, target = self._buffers[table][gen & 1], self._buffers[table][(gen + 1) & 1]
        self._header[ctrl + 1] = gen + 1  # started: readers of `target` (generation gen - 1) now retry
        if rows is None:
            target[:] = values
        else:
            target[:] = active
            target[rows] = values
        self._header[ctrl + 2] = invalid
        self._header[ctrl + 3] += invalid
        self._header[ctrl] = gen + 1  # publish
        self._header[_H_VERSION] += 1

    def _check_rows(self, table: str, values: np.ndarray, rows: np.ndarray | None) -> np.ndarray | None:
        shape = self._buffers[table][0].shape if table in self._buffers else None
        if shape is None:
            raise ViewpipeError(f"sample state {self.name!r} has no {table} table; create it with that table enabled")
        if rows is None:
            if values.shape != shape:
                raise ViewpipeError(f"{table}: expected shape {shape}, got {values.shape}")
            return None
        rows = np.asarray(rows, dtype=np.int64)
        if values.shape != (len(rows), *shape[1:]):
            raise ViewpipeError(f"{table}: {len(rows)} rows need shape {(len(rows), *shape[1:])}, got {values.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            raise ViewpipeError(f"{table}: row indices must lie in [0, {shape[0]})")
        return rows

    def set_boxes(self, boxes: np.ndarray, rows: np.ndarray | None = None, epoch: int | None = None) -> int:
        """Publish boxes (all rows, or `rows`); invalid boxes become the full image. Returns their count."""
        boxes = np.asarray(boxes, dtype=np.float32)
        rows = self._check_rows("boxes", boxes, rows)
        boxes, bad = sanitize_boxes(boxes)
        self._publish("boxes", boxes, rows, bad)
        if epoch is not None:
            self.set_epoch(epoch)
        return bad

    def set_heatmaps(self, heatmaps: np.ndarray, rows: np.ndarray | None = None) -> None:
        heatmaps = np.asarray(heatmaps, dtype=np.uint8)
        rows = self._check_rows("heatmaps", heatmaps, rows)
        self._publish("heatmaps", heatmaps, rows, 0)

    def set_neighbours(self, neighbours: np.ndarray, rows: np.ndarray | None = None) -> int:
        """Publish neighbour indices; rows with an index outside [0, N) become the sample itself."""
        neighbours = np.asarray(neighbours, dtype=np.int32)
        rows = self._check_rows("neighbours", neighbours, rows)
        neighbours, bad = sanitize_neighbours(neighbours, self.layout.n, own=rows)
        self._publish("neighbours", neighbours, rows, bad)
        return bad

    def set_epoch(self, epoch: int) -> None:
        if not self.is_owner:
            raise ViewpipeError(f"sample state {self.name!r} is read-only in this process; only its creator writes")
        self._header[_H_EPOCH] = int(epoch)
        self._header[_H_VERSION] += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """All published tables and counters, for a checkpoint."""
        out = {t: self.read(t) for t in self._buffers}
        out["epoch"] = np.array(self.epoch, dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Publish tables from `state_dict()` output (tables absent from it are left as they are)."""
        for t in self._buffers:
            if t in state:
                getattr(self, f"set_{t}")(np.asarray(state[t]))
        if "epoch" in state:
            self.set_epoch(int(np.asarray(state["epoch"])))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tables to an .npz file atomically (temporary name, then rename)."""
        buf = io.BytesIO()
        np.savez(buf, **self.state_dict())
        write_atomic(path, buf.getvalue())

    def load(self, path: str | os.PathLike[str]) -> None:
        """Publish the tables saved by `save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                self.load_state_dict({k: data[k] for k in data.files})
        except (OSError, ValueError) as exc:
            raise ViewpipeError(f"cannot read sample state file {path} ({exc}); is it a `SampleState.save` file?") from None

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Unmap; the owner also removes the segment (readers already attached keep their mapping)."""
        if self._mm is None:
            return
        if self.is_owner:
            self.path.unlink(missing_ok=True)
            _OWNED.pop(self.name, None)
        self._header = None  # type: ignore[assignment]
        self._buffers = {}
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes when it does
            pass
        os.close(self._fd)
        self._mm = None  # type: ignore[assignment]
        if self._lock is not None:
            # After the unlink: the owner's lock goes last. In a forked child it is already closed (and closing
            # a child's copy would not release the owner's lock anyway).
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SampleState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        tables = ", ".join(f"{t}{self._buffers[t][0].shape}" for t in self._buffers) if self._mm else "closed"
        return f"SampleState({self.name!r}, {tables}, version={self.version if self._mm else '-'})"


# ---------------------------------------------------------------------- segments owned by this process
_OWNED: dict[str, SampleState] = {}
_lock = threading.Lock()
_handlers_installed = False


def _unlink_owned() -> None:
    for state in list(_OWNED.values()):
        if state.is_owner:
            state.path.unlink(missing_ok=True)
    _OWNED.clear()


def _on_sigterm(signum: int, frame: Any) -> None:
    _unlink_owned()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_previous_handlers: dict[int, Any] = {}


def _register_owned(state: SampleState) -> None:
    global _handlers_installed
    with _lock:
        _OWNED[state.name] = state
        if not _handlers_installed:
            atexit.register(_unlink_owned)
            # Ctrl-C raises KeyboardInterrupt, which ends at exit (atexit); SIGTERM would skip atexit.
            if threading.current_thread() is threading.main_thread():
                _previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
            _handlers_installed = True


# ---------------------------------------------------------------------- stale segments
@dataclass
class SegmentInfo:
    """What `viewpipe state list` shows about one segment. Exactly one of three: `alive` (its owner holds the
    segment's lock, or it is being created), `stale` (its owner is proven gone: reclaimable), or neither —
    unknown, kept unless forced; `reason` says why."""

    name: str
    path: Path
    size: int
    owner_pid: int  # as the owner saw it: in the owner's PID namespace, which may not be this one
    alive: bool
    complete: bool
    stale: bool = False
    reason: str = ""
    error: str = ""  # why removing it failed

    @property
    def status(self) -> str:
        return "alive" if self.alive else "stale" if self.stale else "unknown"


def _examine(path: Path) -> tuple[SegmentInfo | None, int]:
    """Inspect one segment: its info (None if it vanished) and the descriptor the lock was probed through
    (-1 if it could not be opened; the caller closes it)."""
    name = path.name[len(PREFIX):]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, -1
    except OSError as exc:
        return SegmentInfo(name, path, 0, -1, False, False, reason=f"cannot stat it ({exc.strerror})"), -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, -1
    except OSError as exc:
        reason = f"cannot open it ({exc.strerror}), so its owner's lock cannot be tested"
        return SegmentInfo(name, path, st.st_size, -1, False, False, reason=reason), -1
    try:
        raw = os.pread(fd, 8 * 16, 0)
    except OSError:
        raw = b""
    held: bool | None
    try:
        held, lock_error = _lock_held(fd), ""
    except OSError as exc:
        held, lock_error = None, exc.strerror or str(exc)
    words = np.frombuffer(raw.ljust(8 * 16, b"\0")[: 8 * 16], dtype=np.int64)
    complete = int(words[_H_MAGIC]) == _MAGIC
    pid, start = (int(words[_H_PID]), int(words[_H_START])) if complete else (-1, -1)
    locking = complete and int(words[_H_LOCKED]) == 1
    info = SegmentInfo(name, path, st.st_size, pid, False, complete)
    if held:
        info.alive = True
        if not complete:
            info.reason = "being created (its creator holds the lock)"
        elif _owner_alive(pid, start):
            info.reason = "its owner holds the segment's lock"
        else:
            info.reason = "its owner holds the segment's lock (in another PID namespace: its pid is not this one's)"
    elif held is None:
        info.reason = f"cannot test its lock ({lock_error})"
    elif not complete:  # no header: being created right now by a viewpipe without locks, or abandoned
        if time.time() - st.st_mtime < _UNBORN_GRACE_S:
            info.alive, info.reason = True, "maybe being created (no header yet)"
        else:
            info.stale, info.reason = True, "abandoned during creation (no header, no lock)"
    elif _owner_alive(pid, start):  # lock free, yet its pid runs here: keep it (it lost its lock somehow)
        info.alive, info.reason = True, f"pid {pid} runs here with the owner's start time"
    elif locking:
        info.stale, info.reason = True, "owner gone (its lock is free)"
    else:
        info.reason = (
            f"made by a viewpipe without owner locks; pid {pid} does not run here, "
            "but its owner may run in another PID namespace"
        )
    return info, fd


def _remove(seg: SegmentInfo, fd: int) -> bool | None:
    """Unlink a segment examined through `fd`, unless the path now names another file (removed and created
    anew meanwhile). True if removed, None if it is gone or another file meanwhile, False if unlinking failed
    (`seg.error` says why)."""
    try:
        if fd >= 0:
            mine, now = os.fstat(fd), os.stat(seg.path)
            if (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino):
                return None
        seg.path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        seg.error = f"cannot remove it ({exc.strerror})"
        return False
    return True


def list_segments() -> list[SegmentInfo]:
    """All viewpipe segments in the shared-memory folder, with whether their owner is alive (see SegmentInfo)."""
    out = []
    for path in sorted(SHM_DIR.glob(f"{PREFIX}*")):
        seg, fd = _examine(path)
        if fd >= 0:
            os.close(fd)
        if seg is not None:
            out.append(seg)
    return out


def clean_segments(force: bool = False) -> tuple[list[SegmentInfo], list[SegmentInfo]]:
    """Remove segments whose owner is proven gone (its lock is free: kill -9, a crash; or abandoned during
    creation) and, with `force`, those whose owner cannot be proven alive either (made by a viewpipe without
    owner locks, unreadable). A segment whose owner is alive is never removed. Returns (removed, kept): kept
    lists the segments not removed that are not alive."""
    removed, kept = [], []
    for path in sorted(SHM_DIR.glob(f"{PREFIX}*")):
        seg, fd = _examine(path)
        try:
            if seg is None or seg.alive:
                continue
            done = _remove(seg, fd) if seg.stale or force else False
            if done:
                removed.append(seg)
            elif done is False:  # not removed (not proven gone, or unlinking failed: `error`)
                kept.append(seg)
        finally:
            if fd >= 0:
                os.close(fd)
    return removed, kept


def reclaim_stale(force: bool = False) -> list[SegmentInfo]:
    """Remove segments whose owning process is gone (left by kill -9 or a crash); return them. `force` also
    removes those whose owner cannot be proven alive (see `clean_segments`)."""
    return clean_segments(force)[0]
