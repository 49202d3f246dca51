"""A sample state's segment in the shared-memory folder, from creation to reclaim: its file, its header, and
whether its owner lives.

Segments live in `SHM_DIR` (/dev/shm) as `viewpipe.<name>`. The creating process removes them at exit and on
SIGTERM. Liveness rests on a lock, not on pids (which mean nothing across PID namespaces, containers sharing
/dev/shm): the owner holds an exclusive `flock` on the segment file for its whole life, through an open file
description of its own that is never mapped, never handed to readers and closed in children it forks, so a
kill -9 of the owner releases it. A segment whose lock can be taken has no live owner and is reclaimed (by the
next `SampleState.create`, or `viewpipe state clean`); one whose lock is held is alive. Segments made without
the lock (header word `H_LOCKED` 0) are alive if their pid and start time match a process here, and otherwise
unknown: kept unless forced.
"""

from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ViewpipeError

if TYPE_CHECKING:
    from .state import SampleState

SHM_DIR = Path(os.environ.get("VIEWPIPE_SHM_DIR", "/dev/shm"))
PREFIX = "viewpipe."
MAGIC = int.from_bytes(b"VIEWPIP1", "little")
LAYOUT = 3  # the header's and tables' layout version (3: the heatmaps' threshold, input size and boxes-key words)
HEADER_BYTES = 4096

# Header: int64 words.
H_MAGIC, H_LAYOUT, H_PID, H_START, H_N, H_HEAT, H_NEIGH, H_VERSION, H_EPOCH = range(9)
H_LOCKED = 9  # 1: the owner holds an flock on the segment file for its lifetime (0 in segments made before that)
# The heatmaps' box threshold, a float64's bit pattern, and the clean input size (H << 32 | W; 0: none yet) the
# heatmaps are upsampled to: one aligned word each, so that one store changes either atomically.
H_THRESHOLD, H_INPUT = 10, 11
# What the boxes table was derived at, if it was (`SampleState.set_derived_boxes`): the heatmaps' generation
# (0: not derived; written last), the threshold word and the input-size word. Loaders read the table while
# these equal the live ones, and derive boxes themselves otherwise.
H_BOXES_GEN, H_BOXES_THRESHOLD, H_BOXES_INPUT = 12, 13, 14
H_TABLES = 16  # per table: generation, started, invalid rows in the last update, invalid rows in all updates
_UNBORN_GRACE_S = 60.0  # a segment without a header this old was abandoned during creation


def segment_path(name: str) -> Path:
    """The file of the segment named `name`."""
    return SHM_DIR / f"{PREFIX}{name}"


def process_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (guards against pid reuse); -1 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_alive(pid: int, start: int) -> bool:
    """Whether pid runs here with this start time: proof of life in this PID namespace only (a pid written in
    another namespace names another process here, or none)."""
    return pid > 0 and process_start(pid) == start


_LOCK_WAIT_S = 5.0  # a creator waits this long for probes (shared locks held for microseconds) to let go


class OwnerLock:
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


_OWNER_LOCKS: set[OwnerLock] = set()


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


def open_segment(path: Path, size: int) -> tuple[int, mmap.mmap, OwnerLock]:
    """Create the segment file at `path` (stale segments reclaimed first; an existing one only if its owner is
    proven gone), lock it for this process's lifetime and map it read-write at `size` bytes: (the mapping's
    descriptor, the mapping, the owner's lock). On failure nothing is left behind."""
    reclaim_stale()
    lock_fd = _create_exclusive(path)
    fd, lock = -1, None
    try:
        # Locked before anything else: from here on every other process sees a live owner. The lock's
        # descriptor is never mapped; the mapping gets a descriptor of its own.
        _take_owner_lock(lock_fd, path)
        lock = OwnerLock(lock_fd)
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
    return fd, mm, lock


def seal_header(header: np.ndarray) -> None:
    """Write the owner's words of a new segment's header (pid, start time, the lock flag, the layout), the magic
    last: a header with magic is complete."""
    header[H_PID] = os.getpid()
    header[H_START] = process_start(os.getpid())
    header[H_LOCKED] = 1
    header[H_LAYOUT] = LAYOUT
    header[H_MAGIC] = MAGIC

# ---------------------------------------------------------------------- segments owned by this process
_OWNED: dict[str, SampleState] = {}  # by name
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


def register_owned(state: SampleState) -> None:
    """Remove `state`'s segment when this process exits or gets SIGTERM (unless it is closed before)."""
    global _handlers_installed
    with _lock:
        _OWNED[state.name] = state
        if not _handlers_installed:
            atexit.register(_unlink_owned)
            # Ctrl-C raises KeyboardInterrupt, which ends at exit (atexit); SIGTERM would skip atexit.
            if threading.current_thread() is threading.main_thread():
                _previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
            _handlers_installed = True


def forget_owned(name: str) -> None:
    """The segment `name`, closed (and removed) by its owner: nothing left to remove at exit."""
    _OWNED.pop(name, None)


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
    st, fd, early = _open_for_probe(path, name)
    if st is None:
        return early, -1
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
    complete = int(words[H_MAGIC]) == MAGIC
    pid, start = (int(words[H_PID]), int(words[H_START])) if complete else (-1, -1)
    info = SegmentInfo(name, path, st.st_size, pid, False, complete)
    _judge(info, held, lock_error, start, complete and int(words[H_LOCKED]) == 1, st.st_mtime)
    return info, fd


def _open_for_probe(path: Path, name: str) -> tuple[os.stat_result | None, int, SegmentInfo | None]:
    """(its stat, a descriptor to probe its lock through, None); where it vanished or cannot be stat'ed or
    opened, (None, -1, None or its info saying why)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, -1, None
    except OSError as exc:
        return None, -1, SegmentInfo(name, path, 0, -1, False, False, reason=f"cannot stat it ({exc.strerror})")
    try:
        return st, os.open(path, os.O_RDONLY | os.O_NONBLOCK), None
    except FileNotFoundError:
        return None, -1, None
    except OSError as exc:
        reason = f"cannot open it ({exc.strerror}), so its owner's lock cannot be tested"
        return None, -1, SegmentInfo(name, path, st.st_size, -1, False, False, reason=reason)


def _judge(info: SegmentInfo, held: bool | None, lock_error: str, start: int, locking: bool, mtime: float) -> None:
    """Set `info`'s verdict (alive, stale or neither) and its reason, from whether another process holds the
    segment's lock (`held`; None: `lock_error` kept it from being tested), its header (`info.complete`, the
    owner's pid and `start` time, whether the owner `locking` locks) and its file's `mtime`."""
    pid = info.owner_pid
    if held:
        info.alive = True
        if not info.complete:
            info.reason = "being created (its creator holds the lock)"
        elif owner_alive(pid, start):
            info.reason = "its owner holds the segment's lock"
        else:
            info.reason = "its owner holds the segment's lock (in another PID namespace: its pid is not this one's)"
    elif held is None:
        info.reason = f"cannot test its lock ({lock_error})"
    elif not info.complete:  # no header: being created right now by a viewpipe without locks, or abandoned
        if time.time() - mtime < _UNBORN_GRACE_S:
            info.alive, info.reason = True, "maybe being created (no header yet)"
        else:
            info.stale, info.reason = True, "abandoned during creation (no header, no lock)"
    elif owner_alive(pid, start):  # lock free, yet its pid runs here: keep it (it lost its lock somehow)
        info.alive, info.reason = True, f"pid {pid} runs here with the owner's start time"
    elif locking:
        info.stale, info.reason = True, "owner gone (its lock is free)"
    else:
        info.reason = (
            f"made by a viewpipe without owner locks; pid {pid} does not run here, "
            "but its owner may run in another PID namespace"
        )


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
