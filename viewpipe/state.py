"""SampleState: per-sample tables (boxes, heatmaps, neighbours) in named shared memory, read live by loaders.

One writer (the trainer) publishes whole tables (or rows of them); any number of readers in other processes
(DataLoader, DALI and FFCV workers) attach by name and read rows while training runs, so an update reaches
running loaders without restarting them.

The rule: every table is double-buffered. The writer fills the inactive copy and then publishes it by bumping
the table's generation; a reader copies rows from the active copy and accepts them only if the writer has not
started refilling that copy meanwhile (a seqlock over two buffers). Readers never wait for a writer and never
see a torn row; a writer killed mid-update leaves the last published table intact. This relies on aligned
8-byte loads and stores being atomic and stores staying in program order, as on x86-64. The segment's file,
header and lifetime (removal at exit, reclaim after kill -9) are `viewpipe.segments`'.

Beside the tables, two header words belong to the heatmaps: the box threshold (a float64's bit pattern in one
aligned int64 word) and the clean input size (H, W) the heatmaps are upsampled to (packed in one word). Loaders
derive each sample's box from its live heatmap at that threshold (`viewpipe.heatmap_boxes.LiveBoxes`) once
heatmaps are published, and read the boxes table before. The threshold is the one word written outside the
single-writer rule: `SampleState.set_threshold_of` (the `viewpipe state set-threshold` command) stores it from
another process. That is safe because it is one aligned 8-byte store that readers load whole (never torn) and
that no table depends on: a reader sees the old or the new threshold, and derives its boxes again when it
changes. Only the version counter (a read-modify-write) can then miss one increment if the owner bumps it at the
same moment; it still changes, and readers key their derived boxes on the threshold word itself.
"""

from __future__ import annotations

import io
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .crop import FULL_BOX
from .errors import ViewpipeError
from .formats import write_atomic
from .segments import (
    H_BOXES_GEN, H_BOXES_INPUT, H_BOXES_THRESHOLD, H_EPOCH, H_HEAT, H_INPUT, H_LAYOUT, H_MAGIC, H_N, H_NEIGH,
    H_TABLES, H_THRESHOLD, H_VERSION, HEADER_BYTES, LAYOUT, MAGIC, PREFIX,
    SHM_DIR, OwnerLock, SegmentInfo, clean_segments, forget_owned, list_segments, open_segment, reclaim_stale,
    register_owned, seal_header, segment_path,
)

__all__ = ["PREFIX", "SHM_DIR", "SampleState", "SegmentInfo", "clean_segments", "list_segments", "reclaim_stale",
           "sanitize_boxes", "sanitize_neighbours"]

_ALIGN = 64
DEFAULT_THRESHOLD = 0.1  # ContrastiveCrop's box threshold t
_TABLES = ("boxes", "heatmaps", "neighbours")


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
        pos, out = HEADER_BYTES, {}
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


def _valid_threshold(threshold: float) -> float:
    """A threshold as a float, or one line saying why it is none."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ViewpipeError(f"a box threshold must be a number, got {threshold!r}") from None
    if not np.isfinite(t):
        raise ViewpipeError(f"a box threshold must be finite, got {threshold!r}")
    return t


def _threshold_word(threshold: float) -> int:
    """The float64's bit pattern as the int64 header word that holds it."""
    return int(np.float64(threshold).view(np.int64))


class SampleState:
    """Named shared-memory tables, one row per sample: boxes (N×4 float32, normalised (h0, w0, h1, w1)),
    optional heatmaps (N×K×K uint8) and neighbours (N×k int32), with a version and an epoch counter.

    Create it in the trainer with `SampleState.create(n, ...)`; pass it (or its `name`) to loaders, whose
    processes `SampleState.attach(name)` (pickling does that automatically).
    """

    def __init__(self, name: str, fd: int, mm: mmap.mmap, owner: bool, lock: OwnerLock | None = None) -> None:
        self.name = name
        self._fd = fd
        self._mm = mm
        self._owner_pid = os.getpid() if owner else -1
        self._lock = lock  # the owner's lock on its segment (None in readers)
        self._header = np.frombuffer(mm, dtype=np.int64, count=HEADER_BYTES // 8)
        if self._header[H_MAGIC] != MAGIC or self._header[H_LAYOUT] != LAYOUT:
            raise ViewpipeError(f"shared segment {self.path} is not a viewpipe sample state (or of another version)")
        self.layout = _Layout(*(int(self._header[i]) for i in (H_N, H_HEAT, H_NEIGH)))
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
        cls, n: int, *, name: str | None = None, heatmap_size: int = 0, neighbours: int = 0,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> SampleState:
        """Create the segment (full-image boxes, zero heatmaps not yet published, each sample its own neighbour,
        the heatmaps' box `threshold`) and own it."""
        threshold = _valid_threshold(threshold)
        if n <= 0:
            raise ViewpipeError(f"a sample state needs at least one sample, got n={n}")
        name = name or f"{os.getpid()}-{secrets.token_hex(4)}"
        layout = _Layout(int(n), int(heatmap_size), int(neighbours))
        _, size = layout.offsets()
        fd, mm, lock = open_segment(segment_path(name), size)
        header = np.frombuffer(mm, dtype=np.int64, count=HEADER_BYTES // 8)
        header[H_N], header[H_HEAT], header[H_NEIGH] = layout.n, layout.heatmap_size, layout.n_neighbours
        header[H_THRESHOLD] = _threshold_word(threshold)
        seal_header(header)
        del header
        state = cls(name, fd, mm, owner=True, lock=lock)
        for buf in state._buffers["boxes"]:
            buf[:] = FULL_BOX
        if "neighbours" in state._buffers:
            for buf in state._buffers["neighbours"]:
                buf[:] = np.arange(n, dtype=np.int32)[:, None]
        register_owned(state)
        return state

    @classmethod
    def attach(cls, name: str) -> SampleState:
        """Attach read-only to an existing state by name (from any process)."""
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ViewpipeError(
                f"no sample state named {name!r} ({path} is missing); was its trainer stopped?"
            ) from None
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            os.close(fd)
            raise ViewpipeError(f"shared segment {path} is incomplete ({size} bytes); run `viewpipe state clean`")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        return cls(name, fd, mm, owner=False)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (SampleState.attach, (self.name,))

    @property
    def path(self) -> Path:
        return segment_path(self.name)

    @property
    def is_owner(self) -> bool:
        return self._owner_pid == os.getpid()

    def __len__(self) -> int:
        return self.layout.n

    @property
    def version(self) -> int:
        """Number of tables published so far; changes whenever any table changes."""
        return int(self._header[H_VERSION])

    @property
    def epoch(self) -> int:
        return int(self._header[H_EPOCH])

    @property
    def threshold(self) -> float:
        """The live box threshold of the heatmaps (loaders derive boxes at it)."""
        return float(np.int64(self._header[H_THRESHOLD]).view(np.float64))

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The clean input size (H, W) the heatmaps are upsampled to, None before heatmaps are published."""
        word = int(self._header[H_INPUT])
        return (word >> 32, word & 0xFFFF_FFFF) if word else None

    def heatmap_key(self) -> tuple[int, int, int] | None:
        """What derived boxes depend on: (heatmap generation, threshold word, input-size word); None while no
        heatmaps are published (no table, none published yet, or no input size): loaders then read boxes."""
        if "heatmaps" not in self._buffers:
            return None
        key = (int(self._header[self._ctrl("heatmaps")]), int(self._header[H_THRESHOLD]), int(self._header[H_INPUT]))
        return key if key[0] > 0 and key[2] else None

    def boxes_key(self) -> tuple[int, int, int] | None:
        """The `heatmap_key` the boxes table was derived at (`set_derived_boxes`), None if it was not: while it
        equals the live key, the table holds exactly the boxes the heatmaps give."""
        gen = int(self._header[H_BOXES_GEN])  # written last by the owner, so read first
        key = (gen, int(self._header[H_BOXES_THRESHOLD]), int(self._header[H_BOXES_INPUT]))
        return key if gen > 0 else None

    def invalid_rows(self, table: str = "boxes", total: bool = False) -> int:
        """Invalid rows replaced by the fallback in the last update of `table` (or in all updates, `total`)."""
        return int(self._header[self._ctrl(table) + (3 if total else 2)])

    def has(self, table: str) -> bool:
        return table in self._buffers

    # ------------------------------------------------------------------ reading
    def _ctrl(self, table: str) -> int:
        return H_TABLES + 4 * _TABLES.index(table)

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
        self._header[H_VERSION] += 1

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
        self._owner_check()
        self._header[H_BOXES_GEN] = 0  # no longer the heatmaps' boxes (before any row changes)
        self._publish("boxes", boxes, rows, bad)
        if epoch is not None:
            self.set_epoch(epoch)
        return bad

    def set_derived_boxes(self, boxes: np.ndarray, threshold: float, epoch: int | None = None) -> int:
        """Publish all boxes as derived from the published heatmaps at `threshold` (and the input size stored
        with them), and record that: loaders read this table instead of deriving while neither changes."""
        bad = self.set_boxes(boxes, epoch=epoch)
        self._mark_derived(threshold)
        return bad

    def _mark_derived(self, threshold: float) -> None:
        """Record the boxes table as derived from the published heatmaps at `threshold`."""
        heat = self.heatmap_key()
        if heat is not None:
            self._header[H_BOXES_THRESHOLD] = _threshold_word(_valid_threshold(threshold))
            self._header[H_BOXES_INPUT] = heat[2]
            self._header[H_BOXES_GEN] = heat[0]  # last: a reader that sees it sees the other two

    def set_heatmaps(self, heatmaps: np.ndarray, rows: np.ndarray | None = None, *,
                     input_size: tuple[int, int] | None = None) -> None:
        """Publish uint8 heatmaps (round(heatmap · 255)); `input_size` (H, W), the clean input size boxes are
        derived at, is stored first (needed once: loaders derive boxes only when it is set)."""
        heatmaps = np.asarray(heatmaps, dtype=np.uint8)
        rows = self._check_rows("heatmaps", heatmaps, rows)
        if input_size is not None:
            h, w = (int(x) for x in input_size)
            if not (0 < h < 2**31 and 0 < w < 2**31):
                raise ViewpipeError(f"heatmaps: the input size must be two positive sides, got {tuple(input_size)}")
            self._owner_check()
            self._header[H_INPUT] = h << 32 | w
        self._publish("heatmaps", heatmaps, rows, 0)

    def set_threshold(self, threshold: float) -> None:
        """Change the heatmaps' box threshold (owner); running loaders derive their boxes at it from then on."""
        self._owner_check()
        self._header[H_THRESHOLD] = _threshold_word(_valid_threshold(threshold))
        self._header[H_VERSION] += 1

    @classmethod
    def set_threshold_of(cls, name: str, threshold: float) -> float:
        """Change the threshold of the state `name` from a process that does not own it (`viewpipe state
        set-threshold`): the header alone mapped read-write, one aligned word stored, the version bumped (the
        one exception to the single-writer rule; see the module's docstring). Returns the old threshold."""
        word = _threshold_word(_valid_threshold(threshold))
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ViewpipeError(f"no sample state named {name!r} ({path} is missing); `viewpipe state list` "
                                "shows the names") from None
        except PermissionError:
            raise ViewpipeError(f"cannot open {path} to write its threshold (permission denied)") from None
        try:
            if os.fstat(fd).st_size < HEADER_BYTES:
                raise ViewpipeError(f"shared segment {path} is incomplete; run `viewpipe state clean`")
            mm = mmap.mmap(fd, HEADER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        header = np.frombuffer(mm, dtype=np.int64)
        if header[H_MAGIC] != MAGIC or header[H_LAYOUT] != LAYOUT:
            problem = f"shared segment {path} is not a viewpipe sample state (or of another version)"
        elif not header[H_HEAT]:
            problem = f"sample state {name!r} has no heatmaps table, so no threshold to change"
        else:
            problem, old = "", float(np.int64(header[H_THRESHOLD]).view(np.float64))
            header[H_THRESHOLD] = word
            header[H_VERSION] += 1
        del header
        mm.close()
        if problem:
            raise ViewpipeError(problem)
        return old

    def set_neighbours(self, neighbours: np.ndarray, rows: np.ndarray | None = None) -> int:
        """Publish neighbour indices; rows with an index outside [0, N) become the sample itself."""
        neighbours = np.asarray(neighbours, dtype=np.int32)
        rows = self._check_rows("neighbours", neighbours, rows)
        neighbours, bad = sanitize_neighbours(neighbours, self.layout.n, own=rows)
        self._publish("neighbours", neighbours, rows, bad)
        return bad

    def _owner_check(self) -> None:
        if not self.is_owner:
            raise ViewpipeError(f"sample state {self.name!r} is read-only in this process; only its creator writes")

    def set_epoch(self, epoch: int) -> None:
        self._owner_check()
        self._header[H_EPOCH] = int(epoch)
        self._header[H_VERSION] += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """All published tables and counters (the epoch; with heatmaps their threshold and input size, (0, 0)
        before any), for a checkpoint."""
        out = {t: self.read(t) for t in self._buffers}
        out["epoch"] = np.array(self.epoch, dtype=np.int64)
        if "heatmaps" in self._buffers:
            out["threshold"] = np.array(self.threshold, dtype=np.float64)
            out["input_size"] = np.array(self.input_size or (0, 0), dtype=np.int64)
            key, derived = self.heatmap_key(), self.boxes_key()  # the threshold the table was derived at, or NaN
            at = np.int64(derived[1]).view(np.float64) if key is not None and derived == key else np.nan
            out["boxes_threshold"] = np.array(at, dtype=np.float64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Publish tables from `state_dict()` output (tables absent from it are left as they are); heatmaps with
        their input size, and the threshold, where it holds them."""
        if "threshold" in state and "heatmaps" in self._buffers:
            self.set_threshold(float(np.asarray(state["threshold"])))
        size = tuple(int(x) for x in np.asarray(state.get("input_size", (0, 0))).tolist())
        for t in self._buffers:
            if t == "heatmaps" and t in state:
                self.set_heatmaps(np.asarray(state[t]), input_size=size if all(size) else None)
            elif t in state:
                getattr(self, f"set_{t}")(np.asarray(state[t]))
        if "epoch" in state:
            self.set_epoch(int(np.asarray(state["epoch"])))
        if np.isfinite(state.get("boxes_threshold", np.nan)):
            self._mark_derived(float(np.asarray(state["boxes_threshold"])))

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
            forget_owned(self.name)
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
