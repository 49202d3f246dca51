"""`viewpipe convert` under faults (issue 16): nothing hangs, nothing is left running, nothing damaged passes.

- FFCV's writer: an image larger than ffcv's default page is written; a source file that vanishes and a disk
  that fills during the writer stage end in seconds with one line, leaving no process behind;
- the worker pool: a worker killed mid-stage is one line, not a hang;
- kill -9 of `convert` (probe stage, FFCV stage): every process it started dies with it;
- a symlink loop in a class folder is followed once;
- `--verify` names every damaged sample (JPEG bytes that still decode, a damaged tar header, FFCV bytes) from
  the checksums written at conversion; an index written before checksums still loads and verifies.

Every conversion is the real command in a subprocess (real ffcv, real processes). The chains start in threads
when the module starts, so that both cores stay busy; each test asserts on what its chain saw.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from viewpipe.formats import DatasetIndex, sample_checksum
from viewpipe.sources import FolderSource

HANG = 90  # a conversion still running after this long is hung (each takes a few seconds here)
QUICK = 20  # seconds from a fault to the one-line error, at most (under the load of the other chains)
GONE = 10  # seconds after which no process a conversion started may still run (all die at once; slack for load)

# the real command, with a sleep added to one stage in the conversion's own module (before main runs), so that
# a fault reliably lands in that stage; everything else is untouched
_SLOWED = """
import sys, time
import viewpipe.beton as b
import viewpipe.convert as c
stage, pause = sys.argv[1], float(sys.argv[2])
if stage == "probe":
    inner_probe = c.probe
    def slow_probe(*a, **k):
        time.sleep(pause)
        return inner_probe(*a, **k)
    c.probe = slow_probe
else:
    inner_item = b._FFCVDataset.__getitem__
    def slow_item(self, k):
        time.sleep(pause)
        return inner_item(self, k)
    b._FFCVDataset.__getitem__ = slow_item
from viewpipe.tools.cli import main
sys.exit(main(sys.argv[3:]))
"""

# execs the command under a file-size limit with SIGXFSZ ignored: writes past it fail with EFBIG, as on a full disk
_FSIZE = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _cmd(*args: object, slowed: tuple[str, float] | None = None, fsize: int | None = None) -> list[str]:
    cmd = [sys.executable, "-c", _SLOWED, slowed[0], str(slowed[1])] if slowed else [sys.executable, "-m", "viewpipe.tools"]
    cmd += [str(a) for a in args]
    if fsize is not None:
        cmd = [sys.executable, "-c", _FSIZE, str(fsize), *cmd]
    return cmd


def _run(*args: object, **kw: Any) -> subprocess.CompletedProcess:
    return _finish(_start(_cmd(*args, **kw)))


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines and all(line.startswith("viewpipe: error: ") for line in lines), res.stderr
    assert "Traceback" not in res.stderr
    return lines


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = _error_lines(res)
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- processes, from /proc
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live process under `root` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (f := _stat(int(d))) and f[0] not in "ZX":
            children.setdefault(int(f[1]), []).append(int(d))
            start[int(d)] = f[19]
    out: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = start[pid]
        todo += children.get(pid, [])
    return out


def _shared_memory(procs: dict[int, str]) -> set[str]:
    """The POSIX shared memory files these processes map (ffcv's writer maps its metadata table)."""
    found = set()
    for pid in procs:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found |= {line.split(None, 5)[5].removesuffix(" (deleted)") for line in maps.splitlines()
                  if "/dev/shm/" in line}
    return found


def _alive(pid: int, started: str) -> bool:
    f = _stat(pid)
    return f is not None and f[0] not in "ZX" and f[19] == started


def _still_running(procs: dict[int, str], within: float) -> list[int]:
    """The processes of `procs` still running after `within` seconds (fewer as soon as they die)."""
    deadline = time.monotonic() + within
    while (left := [p for p, s in procs.items() if _alive(p, s)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _reap(procs: dict[int, str]) -> None:
    for pid, started in procs.items():
        if _alive(pid, started):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(what: str, cond: Any, p: subprocess.Popen, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert p.poll() is None, f"finished before {what}: {p.stderr.read() if p.stderr else ''}"
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.01)


def _ffcv_workers_started(p: subprocess.Popen) -> bool:
    """ffcv's writer processes exist (besides multiprocessing's resource tracker)."""
    found = 0
    for pid in _descendants(p.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found += b"resource_tracker" not in cmd
    return found >= 2


def _finish(p: subprocess.Popen, timeout: float = HANG) -> subprocess.CompletedProcess:
    """Its result, or rc -1 and "hung" when it runs past `timeout`: then it is killed with every process it
    started (its session's group, and its descendants), else their open pipes would block us forever."""
    try:
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        procs = _descendants(p.pid)
        os.killpg(p.pid, signal.SIGKILL)
        _reap(procs)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        return subprocess.CompletedProcess(p.args, -1, out, f"{err}\nhung: still running after {timeout} s")


def _start(cmd: list[str]) -> subprocess.Popen:
    """In a session of its own, so that a hung conversion can be killed with all it started."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


# ---------------------------------------------------------------------------- images
def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _folder(root: Path, n: int, seed: int = 0, classes: tuple[str, ...] = ("a", "b")) -> list[Path]:
    """n small noisy JPEGs in `classes`, in the order the conversion lists them."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        f = root / classes[i % len(classes)] / f"{i:03d}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(_jpeg(rng.integers(0, 256, (24 + i % 7, 30, 3), dtype=np.uint8)))
        files.append(f)
    return sorted(files, key=lambda f: (f.parent.name, f.name))


_BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                          ("alloc_table_ptr", "<u8")], align=True)
_BETON_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])


def _beton_table(path: Path) -> tuple[np.void, np.ndarray]:
    """An FFCV file's header and allocation table (ffcv 1.0's layout), read without importing ffcv."""
    header = np.fromfile(path, dtype=_BETON_HEADER, count=1)[0]
    return header, np.fromfile(path, dtype=_BETON_ALLOC, offset=int(header["alloc_table_ptr"]))


# ---------------------------------------------------------------------------- the chains
def _chain_vanish(base: Path) -> dict[str, Any]:
    """A source file deleted while ffcv's writer runs (its workers read it there)."""
    files = _folder(base / "src", 40)
    dst = base / "out"
    p = _start(_cmd("convert", base / "src", dst, "--workers", "2", "--format", "ffcv", slowed=("ffcv", 0.05)))
    procs: dict[int, str] = {}
    try:
        _wait_for("the FFCV stage", lambda: (dst / "data.beton.tmp").exists() and _ffcv_workers_started(p), p)
        procs = _descendants(p.pid)
        files[-1].unlink()  # the last sample: read about 2 s later
        t = time.monotonic()
        res = _finish(p)
        return {"res": res, "seconds": time.monotonic() - t, "gone": files[-1], "left": _still_running(procs, GONE),
                "report": dst / "convert_report.json"}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        _reap(procs | _descendants(p.pid))


def _chain_disk_full(base: Path) -> dict[str, Any]:
    """The disk fills during the writer stage (ffcv's first page lies past 8 MiB, the limit is 1 MiB)."""
    _folder(base / "src", 12)
    dst = base / "out"
    p = _start(_cmd("convert", base / "src", dst, "--workers", "2", "--format", "ffcv", fsize=1 << 20))
    procs: dict[int, str] = {}
    try:
        _wait_for("the FFCV stage", lambda: (dst / "data.beton.tmp").exists(), p)
        t = time.monotonic()
        procs = _descendants(p.pid)
        res = _finish(p)
        seconds = time.monotonic() - t
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        _reap(procs | _descendants(p.pid))
    resumed = _run("convert", base / "src", dst, "--workers", "2", "--format", "ffcv", "--resume")
    return {"res": res, "seconds": seconds, "dst": dst, "resumed": resumed}


def _chain_kill9(base: Path, stage: str) -> dict[str, Any]:
    """kill -9 of `convert` in the probe stage (its worker pool) or the FFCV stage (ffcv's writer)."""
    _folder(base / "src", 60)
    dst = base / "out"
    # slow enough that a worker's task outlasts the GONE seconds we watch (Pool's workers exited after their task of
    # 16 files once the main process was gone; ffcv's waited forever)
    slowed = ("probe", 0.8) if stage == "probe" else ("ffcv", 0.3)
    p = _start(_cmd("convert", base / "src", dst, "--workers", "2", "--format", "ffcv", slowed=slowed))
    procs: dict[int, str] = {}
    try:
        if stage == "probe":
            _wait_for("the probe workers", lambda: len(_descendants(p.pid)) >= 2, p)
        else:
            _wait_for("the FFCV stage", lambda: (dst / "data.beton.tmp").exists() and _ffcv_workers_started(p), p)
        procs = _descendants(p.pid)
        shm = _shared_memory(procs)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        left = _still_running(procs, GONE)
        return {"procs": procs, "left": left, "shm": shm, "shm_left": [f for f in shm if Path(f).exists()],
                "stderr": p.stderr.read() if p.stderr else ""}
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        _reap(procs)


def _chain_dead_worker(base: Path) -> dict[str, Any]:
    """A probe worker killed (as the OOM killer does): multiprocessing.Pool waits forever on its task."""
    _folder(base / "src", 60)
    p = _start(_cmd("convert", base / "src", base / "out", "--workers", "2", "--format", "dali",
                    slowed=("probe", 0.1)))
    procs: dict[int, str] = {}
    try:
        _wait_for("the probe workers", lambda: len(_descendants(p.pid)) >= 2, p)
        procs = _descendants(p.pid)
        victim = min(procs)
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        res = _finish(p)
        return {"res": res, "seconds": time.monotonic() - t, "victim": victim, "left": _still_running(procs, GONE)}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        _reap(procs)


def _loop_folder(src: Path) -> None:
    rng = np.random.default_rng(3)
    for rel in ("a/x.jpg", "a/sub/y.jpg", "b/z.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(_jpeg(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
    (src / "a" / "self").symlink_to(".")  # the loop: followed 40 levels deep before (41 copies)
    (src / "b" / "again").symlink_to(src / "b")  # the same, by an absolute path


def _chain_loop(base: Path) -> dict[str, Any]:
    src = base / "src"
    _loop_folder(src)
    res = _run("convert", src, base / "out", "--workers", "1", "--format", "dali")
    return {"src": src, "res": res, "dst": base / "out"}


def _damage(path: Path, at: int, n: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


def _chain_convert_verify(base: Path) -> dict[str, Any]:
    """A conversion (both formats) of 12 small images and a 2800x1800 noise image, which ffcv stores as a JPEG of
    about 10 MB at quality 100: more than ffcv's default 8 MiB page (the issue's 48-megapixel JPEG at quality 90
    took 14.6 MB). Then --verify of the result, and of damaged copies: entropy-coded bytes of one sample (which
    still decode); a tar header, a JPEG and the FFCV bytes of three; the index without its checksums (written
    before them)."""
    src = base / "src"
    _folder(src, 12, seed=5)
    big = np.random.default_rng(1).integers(0, 256, (1800, 2800, 3), dtype=np.uint8)
    (src / "a" / "zz_large.jpg").write_bytes(_jpeg(big, 95))
    ref = base / "ref"
    # --max-side 0: natural size (FFCV conversions downscale to 500 by default)
    res = _run("convert", src, ref, "--workers", "2", "--shard-size", "4", "--jpeg-quality", "100", "--max-side", "0")
    if res.returncode != 0:
        return {"res": res}
    index = DatasetIndex.load(ref)
    out: dict[str, Any] = {"res": res, "src": src, "ref": ref, "index": index}

    one = base / "one"
    shutil.copytree(ref, one)
    k = 5
    tar = one / "wds" / f"{int(index.shards[k]):06d}.tar"
    mid = int(index.offsets[k]) + int(index.nbytes[k]) // 2  # in the entropy-coded data
    _damage(tar, mid, 24, seed=1)
    with open(tar, "rb") as f:
        f.seek(int(index.offsets[k]))
        damaged = f.read(int(index.nbytes[k]))
    Image.open(io.BytesIO(damaged)).load()  # still decodes (with a libjpeg warning at most)
    out["one"] = (k, tar)

    three = base / "three"
    shutil.copytree(ref, three)
    line = (three / "wds" / "000000.idx").read_text().splitlines()[1 + 2].split()  # sample 2
    meta_off = int(line[line.index("meta") + 1])
    _damage(three / "wds" / "000000.tar", meta_off - 512, 40, seed=2)  # the .meta member's tar header
    _damage(three / "wds" / "000002.tar", int(index.offsets[9]) + int(index.nbytes[9]) // 2, 16, seed=3)
    row = _beton_table(three / "data.beton")[1]
    row = row[row["sample_id"] == 7][0]
    _damage(three / "data.beton", int(row["ptr"]) + int(row["size"]) // 2, 16, seed=4)
    out["three"] = [2, 7, 9]

    old = base / "old"
    shutil.copytree(ref, old)
    with np.load(old / "index.npz") as z:
        arrays = {name: z[name] for name in z.files if name not in ("checksums", "ffcv_checksums")}
    np.savez(old / "index.npz", **arrays)

    procs = {name: _start(_cmd("convert", "--verify", base / name)) for name in ("ref", "one", "three", "old")}
    out["verify"] = {name: _finish(p) for name, p in procs.items()}
    return out


CHAINS = {"verify": _chain_convert_verify, "vanish": _chain_vanish, "disk_full": _chain_disk_full,
          "kill9_ffcv": lambda b: _chain_kill9(b, "ffcv"), "kill9_probe": lambda b: _chain_kill9(b, "probe"),
          "dead_worker": _chain_dead_worker, "loop": _chain_loop}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    base = tmp_path_factory.mktemp("faults")
    pool = ThreadPoolExecutor(max_workers=len(CHAINS))
    futures: dict[str, Future] = {}
    for name, fn in CHAINS.items():
        (base / name).mkdir()
        futures[name] = pool.submit(fn, base / name)
    yield {name: f for name, f in futures.items()}
    pool.shutdown(wait=True)


def _get(chains: dict[str, Future], name: str) -> dict[str, Any]:
    return chains[name].result(timeout=HANG * 4)


# ---------------------------------------------------------------------------- FFCV's writer
def test_image_larger_than_ffcv_default_page_is_written(chains) -> None:
    seen = _get(chains, "verify")
    _ok(seen["res"])
    ref, index = seen["ref"], seen["index"]
    report = json.loads((ref / "convert_report.json").read_text())
    assert report["complete"] and report["samples_written"] == 13 == report["files_seen"]
    k = [s.decode() for s in index.sources].index(str(seen["src"] / "a" / "zz_large.jpg"))
    assert (index.heights[k], index.widths[k]) == (1800, 2800)
    # ffcv's own file: a page larger than its 8 MiB default, and the sample stored whole in it
    header, table = _beton_table(ref / "data.beton")
    size = int(table[table["sample_id"] == k]["size"][0])
    assert size > 8 << 20, "the test image must exceed ffcv's default page"
    assert header["page_size"] >= size and header["num_samples"] == 13
    v = seen["verify"]["ref"]
    _ok(v)  # every sample's bytes, the large one's too, match the checksums written at conversion
    assert "13 samples (dali: 13 samples, ffcv: 13 samples)" in v.stdout


def test_source_vanishing_in_ffcv_writer_is_one_line_in_seconds(chains) -> None:
    seen = _get(chains, "vanish")
    _one_line_error(seen["res"], str(seen["gone"]), "became unreadable", "--resume")
    assert seen["seconds"] < QUICK, seen["seconds"]
    assert seen["left"] == [], "ffcv's writer processes outlived the conversion"
    assert not seen["report"].exists() or not json.loads(seen["report"].read_text())["complete"]


def test_disk_full_in_ffcv_writer_is_one_line_then_resumes(chains) -> None:
    seen = _get(chains, "disk_full")
    _one_line_error(seen["res"], "no space left", "data.beton", "--resume")
    assert seen["seconds"] < QUICK, seen["seconds"]
    _ok(seen["resumed"])
    report = json.loads((seen["dst"] / "convert_report.json").read_text())
    assert report["complete"] and report["samples_written"] == 12


# ---------------------------------------------------------------------------- worker processes
@pytest.mark.parametrize("stage", ["probe", "ffcv"])
def test_kill9_of_convert_leaves_no_process(chains, stage: str) -> None:
    seen = _get(chains, f"kill9_{stage}")
    assert len(seen["procs"]) >= 2, seen["procs"]  # really killed with its workers running
    assert seen["left"] == [], f"still running {GONE} s after kill -9 of convert: {seen['left']}"
    if stage == "ffcv":  # its shared memory freed (by multiprocessing's resource tracker, once the writer died)
        assert seen["shm"] and seen["shm_left"] == [], (seen["shm"], seen["stderr"][-2000:])


def test_killed_pool_worker_is_one_line_not_a_hang(chains) -> None:
    seen = _get(chains, "dead_worker")
    _one_line_error(seen["res"], "probe worker", str(seen["victim"]), "signal 9", "--resume")
    assert seen["seconds"] < QUICK, seen["seconds"]
    assert seen["left"] == [], "pool workers outlived the conversion"


# ---------------------------------------------------------------------------- symlinks
def test_symlink_loop_is_followed_once(chains, tmp_path: Path) -> None:
    _loop_folder(tmp_path)
    source = FolderSource(tmp_path, extensions=None)
    assert source.paths == [str(tmp_path / r) for r in ("a/x.jpg", "a/sub/y.jpg", "b/z.jpg")]  # ImageFolder's order
    assert source.labels.tolist() == [0, 0, 1]
    assert source.repeated_folders == [str(tmp_path / "a" / "self"), str(tmp_path / "b" / "again")]
    seen = _get(chains, "loop")
    _ok(seen["res"])
    report = json.loads((seen["dst"] / "convert_report.json").read_text())
    assert report["files_seen"] == report["samples_written"] == 3, report
    assert report["repeated_folders"] == [str(seen["src"] / "a" / "self"), str(seen["src"] / "b" / "again")]


def test_folder_linked_from_outside_is_listed_once(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.jpg").write_bytes(b"x")
    root = tmp_path / "root"
    for c in ("c", "e"):
        (root / c / "d").mkdir(parents=True)
        (root / c / "d" / "own.jpg").write_bytes(b"x")
    (root / "c" / "l1").symlink_to(outside)
    (root / "c" / "l2").symlink_to(outside)
    (root / "c" / "d" / "up").symlink_to("..")  # a loop through a subfolder
    (root / "e" / "l3").symlink_to(root / "e" / "d")  # a real folder of the class: kept at its own path
    source = FolderSource(root, extensions=None)
    assert source.paths == [str(root / "c" / "d" / "own.jpg"), str(root / "c" / "l1" / "o.jpg"),
                            str(root / "e" / "d" / "own.jpg")]
    assert source.labels.tolist() == [0, 0, 1]
    assert source.repeated_folders == [str(root / "c" / "d" / "up"), str(root / "c" / "l2"), str(root / "e" / "l3")]


# ---------------------------------------------------------------------------- --verify and checksums
def test_verify_names_every_damaged_sample(chains) -> None:
    seen = _get(chains, "verify")
    _ok(seen["res"])
    index, ref = seen["index"], seen["ref"]
    assert index.checksums is not None and index.ffcv_checksums is not None
    assert index.checksums.dtype == np.uint32 and len(index.checksums) == len(index) == 13
    with open(ref / "wds" / "000001.tar", "rb") as f:  # the checksum is sample_checksum of the shard's bytes
        f.seek(int(index.offsets[4]))
        assert sample_checksum(f.read(int(index.nbytes[4]))) == index.checksums[4]
    v = seen["verify"]

    k, tar = seen["one"]  # damaged entropy-coded bytes that still decode: named, not passed
    _one_line_error(v["one"], str(tar), f"sample {k} ", index.sources[k].decode(), "damaged image bytes")

    lines = _error_lines(v["three"])  # one line per damaged sample, then the count
    assert len(lines) == 4, lines
    named = {int(line.split(" sample ")[1].split()[0]): line for line in lines[:3]}
    assert sorted(named) == seen["three"], lines
    assert "000000.tar" in named[2] and "tar header" in named[2] and index.sources[2].decode() in named[2]
    assert "000002.tar" in named[9] and "damaged image bytes" in named[9]
    assert "data.beton" in named[7] and "damaged image bytes" in named[7] and index.sources[7].decode() in named[7]
    assert "3 damaged" in lines[3] and "KeyError" not in v["three"].stderr

    _ok(v["old"])  # an index written before checksums: loads, and verifies by decoding
    assert "13 samples" in v["old"].stdout


def test_index_without_checksums_loads(tmp_path: Path) -> None:
    n = 3
    np.savez(tmp_path / "index.npz", labels=np.arange(n), heights=np.ones(n, np.int32), widths=np.ones(n, np.int32),
             sources=np.array([b"a", b"b", b"c"]), shards=np.zeros(n, np.int32), offsets=np.zeros(n, np.int64),
             nbytes=np.zeros(n, np.int64))
    (tmp_path / "classes.txt").write_text("0\tx\n")
    index = DatasetIndex.load(tmp_path)
    assert index.checksums is None and index.ffcv_checksums is None and len(index) == n
    index.checksums = np.array([sample_checksum(b"a"), 1, 2], np.uint32)
    index.save(tmp_path)
    again = DatasetIndex.load(tmp_path)
    assert again.checksums.tolist() == [sample_checksum(b"a"), 1, 2] and again.ffcv_checksums is None
    assert sample_checksum(b"a") == sample_checksum(memoryview(b"a")) == sample_checksum(np.frombuffer(b"a", np.uint8))
