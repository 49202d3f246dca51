"""Worker processes that cannot hang the command: `Workers` (the probe and shard stages' pool) and the process
helpers the FFCV writer's supervision uses.

The rule: a worker dies with the main process (PR_SET_PDEATHSIG on Linux), a worker that fails or dies ends
the stage with one line (a `ViewpipeError` naming it and how it ended, never a wait), and shutting workers
down is bounded (a bounded join, then SIGKILL, then a bounded join).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from viewpipe.errors import ViewpipeError


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (kill -9 of `convert` leaves no
    worker behind); exit at once if the parent is already gone. Elsewhere only the second part."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it survives a pickle round trip (to be re-raised in the main process), else a plain stand-in."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(conn, parent: int, init: Callable[..., None] | None, args: tuple) -> None:  # noqa: ANN001
    """One worker of `Workers` (`conn` its multiprocessing Connection): tied to the life of `parent`, Ctrl-C left
    to the main process, `init(*args)` first; then it runs the chunks it is sent, answering each with (True,
    results) or (False, error)."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if init is not None:
        init(*args)
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


def exit_reason(code: int | None) -> str:
    """How a process with exit code `code` (multiprocessing's: -N for signal N) ended, as a phrase."""
    if code is not None and code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Workers:
    """Forked worker processes for one stage (multiprocessing.Pool's replacement), each running `init(*args)`
    first: `imap` gives results in order, re-raises a worker's error, and turns a worker that dies (kill -9, out
    of memory) into one `ViewpipeError` instead of waiting forever as Pool does; closing can never hang (a
    bounded join, then SIGKILL, then a bounded join: Pool.terminate deadlocked on a full disk). Workers die with
    the main process."""

    def __init__(self, workers: int, stage: str, init: Callable[..., None] | None = None, args: tuple = ()) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.stage = stage
        self.procs: list = []
        self.conns: list = []
        try:
            for _ in range(max(1, workers)):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(theirs, os.getpid(), init, args), daemon=True,
                                   name=f"viewpipe-{stage}")
                proc.start()
                theirs.close()  # only the worker holds its end: its death reads as EOF here
                self.procs.append(proc)
                self.conns.append(mine)
        except BaseException:
            self.close(graceful=False)
            raise

    def __enter__(self) -> Workers:
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
        return ViewpipeError(f"a {self.stage} worker process (pid {proc.pid}) {exit_reason(proc.exitcode)}"
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


def proc_state(pid: int) -> tuple[str, int | None]:
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


def describe_death(pid: int) -> str:
    state, status = proc_state(pid)
    if state == "Z" and status is not None:
        return exit_reason(-(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF)
    return "died"


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def progress(it: Iterator, total: int | None, desc: str, unit: str = "file") -> Iterator:
    """`it` with a tqdm progress bar on a terminal (none where stderr is not one)."""
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, smoothing=0.1, disable=None)
