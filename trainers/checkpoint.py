"""Checkpoint files: atomic writes that carry their own SHA-256, verified on every read, the last two kept
(`last.pt` and `last.prev.pt`), a fall-back to the previous one when the latest is damaged, and the RNG states
a resume restores.

The format is torch.save's zip archive followed by a fixed-length trailer line

    \\nviewpipe-checkpoint sha256:<64 hex digits> bytes:<16 decimal digits>\\n

holding the SHA-256 and the length of the archive before it. Zip readers find an archive from its end record
and ignore what follows it, so `torch.load(path)` still reads these files as before (scripts, other tools);
`read_checkpoint` checks the trailer first and refuses a file whose bytes changed (a disk or copy error, bytes
overwritten in the middle: what torch.load alone would load without complaint and train into NaN).
A file without the trailer (written before checksums, or by plain torch.save) loads unverified with a warning.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from viewpipe.errors import ViewpipeError
from viewpipe.formats import write_atomic

MAGIC = b"\nviewpipe-checkpoint sha256:"
_TRAILER = re.compile(rb"\nviewpipe-checkpoint sha256:([0-9a-f]{64}) bytes:([0-9]{16})\n\Z")
TRAILER_LEN = len(MAGIC) + 64 + len(b" bytes:") + 16 + 1


class CheckpointError(ViewpipeError):
    """A checkpoint that cannot be used: missing, damaged, not a checkpoint, or none good to fall back to."""


def warn(message: str) -> None:
    """A one-line warning on stderr, in the style of the `viewpipe` command's errors."""
    print(f"viewpipe: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's RNG states: torch (CPU and every GPU), NumPy's global generator, Python's."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every GPU), NumPy's global generator and Python's with `seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------- names
def previous_path(path: Path) -> Path:
    """The previous good checkpoint kept beside `path`: last.pt → last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def damaged_path(path: Path) -> Path:
    """Where a damaged latest checkpoint is moved at the next save (kept for inspection, never loaded)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.damaged{path.suffix}")


def _tmp_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp")


def remove_stale_tmp(path: Path) -> list[Path]:
    """Remove the temporary files (`.last.pt.<8 hex>.tmp`) that a process killed during a save of `path` left
    beside it; returns those removed. Only one process saves into a run folder, so at a start or before a save
    any such file is a leftover."""
    path = Path(path)
    pattern, removed = _tmp_pattern(path), []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if pattern.fullmatch(p.name):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- writing
def serialize(obj: Any) -> tuple[memoryview, bytes]:
    """torch.save's bytes of `obj` and the checksum trailer to write after them."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    trailer = MAGIC + f"{digest} bytes:{len(payload):016d}\n".encode()
    assert len(trailer) == TRAILER_LEN
    return payload, trailer


def save_checkpoint(obj: Any, path: Path, previous: str = "verify") -> None:
    """Write `obj` to `path` atomically, with its checksum, keeping the checkpoint it replaces as
    `previous_path(path)`. `previous` says what is known of the file at `path` now: "keep" (good: written or
    verified by this run), "verify" (check it first: a damaged one is moved to `damaged_path` instead of
    replacing the good previous one), "drop" (another run's: replaced, and its previous one removed, so that
    a fall-back never lands in another run). Stale temporary files of earlier saves are removed first."""
    path = Path(path)
    remove_stale_tmp(path)
    payload, trailer = serialize(obj)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.write(trailer)
            f.flush()
            os.fsync(f.fileno())
        prev = previous_path(path)
        if previous == "drop":
            prev.unlink(missing_ok=True)
        elif path.is_file():
            if previous == "keep" or verify(path)[0] == "ok":
                os.replace(path, prev)  # (a kill here leaves prev alone: read_checkpoint falls back to it)
            else:
                os.replace(path, damaged_path(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------- reading
def verify(path: Path, data: bytes | None = None) -> tuple[str, str]:
    """("ok", ""), ("unverified", why) for a file without a checksum trailer, or ("bad", why) for a missing,
    empty or damaged one. `data`: the file's bytes, when already read."""
    path = Path(path)
    if data is None:
        if not path.exists():
            return "bad", "no such file"
        if not path.is_file():
            return "bad", "not a file"
        try:
            data = path.read_bytes()
        except OSError as exc:
            return "bad", f"cannot be read ({exc.strerror or exc})"
    if not data:
        return "bad", "empty file"
    m = _TRAILER.search(data[-TRAILER_LEN:]) if len(data) >= TRAILER_LEN else None
    if m is None:
        return "unverified", "no viewpipe checksum"
    digest, size = m.group(1).decode(), int(m.group(2))
    if size != len(data) - TRAILER_LEN:
        return "bad", f"damaged: {len(data) - TRAILER_LEN} bytes before its checksum, {size} written"
    if hashlib.sha256(memoryview(data)[:size]).hexdigest() != digest:
        return "bad", "damaged: its SHA-256 does not match the one written with it"
    return "ok", ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def read_checkpoint(path: Path, required: tuple[str, ...] = ()) -> tuple[dict, str]:
    """The checkpoint at `path` (on the CPU) after its checksum is verified, and a note ("" or why it was
    loaded unverified); a CheckpointError (one line) for a missing, damaged or unreadable file, or one that is
    not a dict with the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {verify(path)[1]}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    status, why = verify(path, data)
    if status == "bad":
        raise CheckpointError(f"{path}: {why}")
    try:  # (zip readers ignore the trailer after the archive; BytesIO shares the bytes, no copy)
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001  (pickle, zip and torch errors of every kind: one line)
        what = "not a checkpoint" if status == "unverified" else "checksum good but torch cannot load it"
        raise CheckpointError(f"{path}: cannot read the checkpoint, {what} ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a viewpipe checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a viewpipe pretraining checkpoint (no {', '.join(missing)})")
    note = f"{path}: {why}: loaded unverified" if status == "unverified" else ""
    return ckpt, note


# what the fall-back's lines say, by what the checkpoint is read for: (doing it, what to do when none is good)
_USES = {"resume": ("resuming from", "resume from another checkpoint, or start afresh without --resume"),
         "read": ("reading", "give another checkpoint (runs/<name>/last.pt of `viewpipe pretrain`)")}


def load_checkpoint(path: Path, required: tuple[str, ...] = (), use: str = "resume") -> tuple[dict, Path, list[str]]:
    """`read_checkpoint(path)`, or, when that fails, the previous good checkpoint kept beside it
    (`previous_path(path)`). Returns (checkpoint, the path it came from, one-line warnings). A CheckpointError
    naming both files when neither is good. `use`: what it is read for, in those lines ("resume": `--resume`
    and `export`; "read": `viewpipe eval`)."""
    path = Path(path)
    doing, fix = _USES[use]
    try:
        ckpt, note = read_checkpoint(path, required)
        return ckpt, path, [note] if note else []
    except CheckpointError as exc:
        first = str(exc)
    prev = previous_path(path)
    if not prev.exists():
        raise CheckpointError(f"{first}; no previous checkpoint {prev.name} beside it to fall back to: {fix}")
    try:
        ckpt, note = read_checkpoint(prev, required)
    except CheckpointError as exc:
        raise CheckpointError(f"{first}; {exc}; no good checkpoint to {use} from: {fix}") from None
    step = f" (step {ckpt['step']})" if isinstance(ckpt.get("step"), int) else ""
    warnings = [f"{first}; {doing} the previous checkpoint {prev}{step} instead"]
    return ckpt, prev, warnings + ([note] if note else [])


# ---------------------------------------------------------------------------------------------- run folders
RUN_FILES = ("last.pt", "last.prev.pt", "log.jsonl")


def run_files(out: Path) -> list[str]:
    """The names of the files in `out` that show a run has used it (a checkpoint, a non-empty log.jsonl): a new
    run there would append to that run's log and replace its checkpoints, so it needs --resume."""
    out = Path(out)
    found = []
    for name in RUN_FILES:
        p = out / name
        try:
            if p.is_file() and (name != "log.jsonl" or p.stat().st_size > 0):
                found.append(name)
        except OSError:
            found.append(name)
    return found


def trim_log(path: Path, step: int) -> int:
    """Drop the records of JSONL log `path` after `step` (those whose "step" is larger), so that a run resumed
    from the checkpoint of `step` does not log the steps it runs again twice. Written atomically; lines that
    are not JSON (a line cut by a kill) are dropped too. Returns the number of lines removed."""
    import json

    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        s = record.get("step") if isinstance(record, dict) else None
        if isinstance(s, int) and s > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped
