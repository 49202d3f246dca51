"""`viewpipe convert`: every kind of bad input, read-back by DALI and FFCV, --verify, interruption and --resume,
fatal conditions, `.npz` sources and the options.

Every conversion runs the real command in a subprocess. The commands are started in background threads when the
module starts (`jobs`), in independent chains (convert then verify; interrupt, refuse, resume; ...), so that both
cores stay busy while the tests assert on what each chain saw, in the tests' own order.

The folder the tests build holds every bad kind of file at once. Its conversions run as root *without*
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (`setpriv` drops them from the bounding set), so that a `chmod 000` file
really gives a permission error although the tests run as root; `user=nobody` cannot start this venv's
interpreter, which lives under /root. Other users need no drop.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from viewpipe.formats import DatasetIndex, open_image

VIEWPIPE = [sys.executable, "-m", "viewpipe.tools"]
CLASSES = ["alpha", "beta", "delta", "gamma"]  # beta stays empty: its index (1) must survive
OPTS = ["--workers", "1", "--shard-size", "4", "--max-pixels", "2000"]
N_FILLERS = 33  # plain JPEGs beside the bad files: 38 samples, 10 shards
TIMEOUT = 240


# ---------------------------------------------------------------------------- running the command
# a wrapper that execs the command under a file-size limit with SIGXFSZ ignored: writes past the limit then fail
# with EFBIG, as on a full disk (a wrapper rather than preexec_fn, which is unsafe beside the jobs' threads)
_FSIZE = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
os.execv(sys.argv[2], sys.argv[2:])
"""

# the real command with a sleep added to one stage (in the conversion's own module, before main runs), so that
# an interruption reliably lands in that stage; everything else is untouched
_SLOWED = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also when pytest runs with it ignored
import viewpipe.beton as b
import viewpipe.convert as c
if sys.argv[1] == "shards":
    inner_bytes = c.shard_bytes
    def slow_bytes(*a, **k):
        time.sleep(0.1)
        return inner_bytes(*a, **k)
    c.shard_bytes = slow_bytes
else:
    inner_item = b._FFCVDataset.__getitem__
    def slow_item(self, k):
        time.sleep(0.1)
        return inner_item(self, k)
    b._FFCVDataset.__getitem__ = slow_item
from viewpipe.tools.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _cmd(*args: object, fsize: int | None = None, slowed: str | None = None) -> list[str]:
    cmd = [sys.executable, "-c", _SLOWED, slowed] if slowed else list(VIEWPIPE)
    cmd += [str(a) for a in args]
    if fsize is not None:
        cmd = [sys.executable, "-c", _FSIZE, str(fsize), *cmd]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to run as root bound by file permissions"
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]
    return cmd


def viewpipe(*args: object, fsize: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args, fsize=fsize), capture_output=True, text=True, timeout=TIMEOUT)


def start_viewpipe(*args: object) -> subprocess.Popen:
    return subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _report(dst: Path) -> dict | None:
    path = dst / "convert_report.json"
    return json.loads(path.read_text()) if path.exists() else None


def _not_complete(report: dict | None) -> None:
    assert report is None or report["complete"] is False, report


def _group(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes of a process group."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append((int(d), cmd))
    return found


def _drain_group(pgid: int, timeout: float = 15) -> None:
    """Stop what is left of a killed conversion's process group (ffcv's writer processes are not daemons), but
    let multiprocessing's resource tracker exit by itself, so that it unlinks ffcv's shared memory."""
    members = partial(_group, pgid)
    deadline = time.monotonic() + timeout
    while (left := members()) and time.monotonic() < deadline:
        for pid, cmd in left:
            if "resource_tracker" not in cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    for pid, _ in members():  # a tracker that did not finish in time
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- images and read-back
def _gradient(h: int, w: int, seed: int) -> Image.Image:
    """Smooth (JPEG-friendly) and orientation-revealing: red grows left to right, green top to bottom."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full((h, w), seed * 37 % 256)], -1)
    return Image.fromarray(img.astype(np.uint8))


def _encode(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _center_crop_16(img: np.ndarray) -> np.ndarray:
    """What ffcv's CenterCropRGBImageDecoder((16, 16), 1.0) does to a decoded image."""
    import cv2

    h, w = img.shape[:2]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    return cv2.resize(np.ascontiguousarray(img[top : top + c, left : left + c]), (16, 16), interpolation=cv2.INTER_AREA)


_LOADERS: list = []


def _ffcv_read(beton: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (center crops, 16×16), labels and stored (height, width) as ffcv's own Loader and Reader see them."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    assert reader.field_names == ["image", "label"]
    meta = reader.metadata["f0"]
    sizes = np.stack([meta["height"], meta["width"]], 1).astype(np.int64)
    loader = Loader(str(beton), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]})
    _LOADERS.append(loader)  # freed at exit: numba's finalizer raises a harmless KeyError when one is freed earlier
    images, labels = [], []
    for img, lab in loader:
        images.append(np.array(img, copy=True))
        labels.append(np.array(lab, copy=True).reshape(-1))
    return np.concatenate(images), np.concatenate(labels), sizes


def _dali_read(dst: Path) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """(meta, cls, image) of every sample, in reading order, by a plain DALI webdataset pipeline on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted((dst / "wds").glob("*.tar"))
    assert tars
    idxs = [t.with_suffix(".idx") for t in tars]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():  # noqa: ANN202
        img, meta, cls = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs],
                                               ext=["jpg;png", "meta", "cls"],
                                               dtypes=[types.UINT8, types.INT64, types.UINT8], name="reader")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), meta, cls

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    out: list = []
    while len(out) < n:
        imgs, metas, clss = p.run()
        for k in range(len(imgs)):
            if len(out) < n:
                cls = int(bytes(np.array(clss[k])).decode())
                out.append((np.array(metas[k]).copy(), cls, np.array(imgs[k]).copy()))
    return out


def _shard_bytes(dst: Path, index: DatasetIndex, k: int) -> bytes:
    with open(dst / "wds" / f"{int(index.shards[k]):06d}.tar", "rb") as f:
        f.seek(int(index.offsets[k]))
        return f.read(int(index.nbytes[k]))


# ---------------------------------------------------------------------------- the folder with every bad kind
class Expected:
    """What converting the bad folder must give: the kept samples in index order, and the skipped files."""

    def __init__(self) -> None:
        self.samples: list[dict] = []  # file, label, height, width (after orientation), ext, converted
        self.skipped: dict[str, str] = {}  # file -> start of its reason


def _build_bad_folder(root: Path) -> Expected:
    rng = np.random.default_rng(7)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    exp = Expected()
    kept: dict[str, dict] = {}

    def keep(rel: str, data: bytes, h: int, w: int, ext: str, converted: bool = False) -> None:
        (root / rel).write_bytes(data)
        kept[rel] = {"file": str(root / rel), "label": CLASSES.index(rel.split("/")[0]), "height": h, "width": w,
                     "ext": ext, "converted": converted}

    def skip(rel: str, reason: str) -> None:
        exp.skipped[str(root / rel)] = reason

    keep("alpha/00_cmyk.jpg", _encode(_gradient(24, 16, 1).convert("CMYK")), 24, 16, "jpg", converted=True)
    keep("alpha/01_png.JPEG", _encode(_gradient(18, 26, 2), "PNG"), 18, 26, "png")
    keep("alpha/02_gray.jpg", _encode(_gradient(22, 28, 3).convert("L")), 22, 28, "jpg")
    keep("gamma/03_rot6.jpg", _encode(_gradient(16, 40, 4), exif=_exif(6)), 40, 16, "jpg")  # stored 40 wide
    keep("delta/04_rot8.jpg", _encode(_gradient(20, 36, 5), exif=_exif(8)), 36, 20, "jpg")
    full = _encode(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    (root / "gamma/05_truncated.jpg").write_bytes(full[: len(full) - 400])
    skip("gamma/05_truncated.jpg", "truncated or corrupt (")
    (root / "gamma/06_empty.jpg").write_bytes(b"")
    skip("gamma/06_empty.jpg", "empty file")
    (root / "gamma/07_notes.txt").write_text("not an image\n")
    skip("gamma/07_notes.txt", "not an image")
    (root / "gamma/08_huge.jpg").write_bytes(_encode(_gradient(48, 64, 6)))  # 3072 pixels > --max-pixels 2000
    skip("gamma/08_huge.jpg", "too large (64x48 > 2000 pixels")
    (root / "gamma/09_noperm.jpg").write_bytes(_encode(_gradient(20, 20, 7)))
    os.chmod(root / "gamma/09_noperm.jpg", 0)
    skip("gamma/09_noperm.jpg", "cannot read (Permission denied)")
    (root / "gamma/10_dangling.jpg").symlink_to(root / "gone.jpg")
    skip("gamma/10_dangling.jpg", "cannot read (No such file or directory)")
    (root / "stray.jpg").write_bytes(_encode(_gradient(20, 20, 8)))
    skip("stray.jpg", "not in a class folder")
    for i in range(N_FILLERS):
        h, w = (int(v) for v in rng.integers(16, 41, 2))
        keep(f"{('alpha', 'delta', 'gamma')[i % 3]}/f{i:03d}.jpg", _encode(_gradient(h, w, 10 + i)), h, w, "jpg")
    exp.samples = [kept[k] for k in sorted(kept, key=lambda r: tuple(r.split("/")))]  # ImageFolder's order
    return exp


# .npz sources, file per split: (stored height, stored width, kind); train -> DALI only, val -> FFCV only
NPZ_FILES = {
    "train": [(16, 20, "plain"), (30, 18, "plain"), (20, 20, "empty"), (20, 36, "rot6"), (20, 20, "cmyk")],
    "val": [(22, 16, "plain"), (16, 28, "plain"), (40, 16, "rot8"), (26, 26, "gray")],
}
NPZ_FORMAT = {"train": "dali", "val": "ffcv"}


def _build_npz(path: Path) -> dict[str, np.ndarray]:
    """A tiny `.npz` JPEG collection in the documented layout (uncompressed members, as ../shared/data)."""
    arrays: dict[str, np.ndarray] = {"class_names": np.array([b"cat", b"dog", b"emu"])}
    for split, entries in NPZ_FILES.items():
        files = []
        for i, (h, w, kind) in enumerate(entries):
            img = _gradient(h, w, i + 20 * (split == "val"))
            files.append({"plain": lambda: _encode(img), "empty": lambda: b"",
                          "cmyk": lambda: _encode(img.convert("CMYK")), "gray": lambda: _encode(img.convert("L")),
                          "rot6": lambda: _encode(img, exif=_exif(6)), "rot8": lambda: _encode(img, exif=_exif(8)),
                          }[kind]())
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(files), np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array([2, 0, 1, 2, 0][: len(entries)], np.int64)
        arrays[f"{split}_src_path"] = np.array([f"{split}/x{i}.jpg".encode() for i in range(len(entries))])
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------------------- the jobs
class Jobs:
    """Chains of commands, each in a thread; `get` waits for one and returns its result or raises its error."""

    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, tuple[bool, Any]] = {}

    def start(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                self._results[name] = (True, fn(*args))
            except BaseException as exc:  # noqa: BLE001  re-raised in the test that asks
                self._results[name] = (False, exc)

        self._threads[name] = threading.Thread(target=run, name=name, daemon=True)
        self._threads[name].start()

    def get(self, name: str) -> Any:
        self._threads[name].join(TIMEOUT * 3)
        assert not self._threads[name].is_alive(), f"job {name} did not finish"
        ok, value = self._results[name]
        if not ok:
            raise value
        return value

    def join(self) -> None:
        for t in self._threads.values():
            t.join(TIMEOUT * 3)


def _job_verify(jobs: Jobs, ref: Path, base: Path) -> dict[str, Any]:
    """--verify of the reference and of damaged copies, all at once."""
    _ok(jobs.get("converted"))
    damaged = {}
    for name in ("no_shard", "bad_meta", "incomplete"):
        damaged[name] = base / name
        shutil.copytree(ref, damaged[name])
    (damaged["no_shard"] / "wds" / "000001.tar").unlink()
    line = (ref / "wds" / "000000.idx").read_text().splitlines()[2]  # sample 1: "jpg OFF SIZE NAME cls ... meta OFF ..."
    parts = line.split()
    label = int(DatasetIndex.load(ref).labels[1])
    with open(damaged["bad_meta"] / "wds" / "000000.tar", "r+b") as f:
        f.seek(int(parts[parts.index("meta") + 1]))
        f.write(np.array([1, label + 1], "<i8").tobytes())
    report = _report(damaged["incomplete"])
    report["complete"] = False
    (damaged["incomplete"] / "convert_report.json").write_text(json.dumps(report))
    procs = {name: start_viewpipe("convert", "--verify", dst) for name, dst in damaged.items()}
    procs["good"] = start_viewpipe("convert", "--verify", ref)
    return {name: _finish(p) for name, p in procs.items()}


def _job_interrupt(src: Path, dst: Path, sig: int, stage: str) -> dict[str, Any]:
    """Interrupt a conversion in `stage`, note what it left, then rerun without and with --resume."""
    seen: dict[str, Any] = {}
    out, err = dst.parent / f"{dst.name}.stdout", dst.parent / f"{dst.name}.stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen(_cmd("convert", src, dst, *OPTS, slowed=stage), stdout=fo, stderr=fe,
                             start_new_session=True)
    try:
        pattern = "wds/*.idx" if stage == "shards" else "data.beton.tmp"
        deadline = time.monotonic() + TIMEOUT
        while not list(dst.glob(pattern)):
            assert p.poll() is None, f"finished before the interruption: {err.read_text()}"
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.005)
        # ffcv creates the file, then its shared memory, then its writer processes: wait for these, so that the
        # kill never falls between creating the shared memory and handing it to the resource tracker (a leak)
        while stage == "ffcv" and not [m for m in _group(p.pid) if m[0] != p.pid and "resource_tracker" not in m[1]]:
            assert p.poll() is None, f"finished before the interruption: {err.read_text()}"
            assert time.monotonic() < deadline, "ffcv's writer processes never started"
            time.sleep(0.005)
        if sig == signal.SIGINT:
            os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            os.kill(p.pid, signal.SIGKILL)
        seen["rc"] = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        _drain_group(p.pid)
    seen["stderr"] = err.read_text()
    seen["report"] = _report(dst)
    seen["idx"] = len(list(dst.glob("wds/*.idx")))
    seen["beton"] = (dst / "data.beton").exists()
    seen["beton_tmp"] = (dst / "data.beton.tmp").exists()
    if sig == signal.SIGINT:
        seen["rerun"] = viewpipe("convert", src, dst, *OPTS)  # without --resume
        seen["report_after_rerun"] = _report(dst)
    seen["resume"] = viewpipe("convert", src, dst, *OPTS, "--resume")
    return seen


def _job_disk_full(src: Path, dst: Path, ref: Path) -> dict[str, Any]:
    opts = [*OPTS, "--format", "dali"]
    p_ref = start_viewpipe("convert", src, ref, *opts)
    seen: dict[str, Any] = {"full": viewpipe("convert", src, dst, *opts, fsize=8192)}  # a shard of 4 needs ~12 kB
    seen["report"] = _report(dst)
    seen["probed"] = (dst / ".work" / "probe-000000.json").exists()
    seen["tar_tmp"] = len(list(dst.glob("wds/*.tar.tmp")))
    seen["idx"] = len(list(dst.glob("wds/*.idx")))
    seen["other_options"] = viewpipe("convert", src, dst, *OPTS, "--format", "dali", "--shard-size", "5", "--resume")
    seen["report_after_refusal"] = _report(dst)
    seen["resume"] = viewpipe("convert", src, dst, *opts, "--resume")
    seen["ref"] = _finish(p_ref)
    seen["finished_other_options"] = viewpipe("convert", src, dst, *opts, "--max-side", "24", "--resume")
    return seen


def _job_fatal(src: Path, base: Path) -> dict[str, Any]:
    (base / "a_file").write_text("x")
    (base / "readonly").mkdir()
    os.chmod(base / "readonly", 0o555)
    # (a folder without class folders is no longer fatal: an unlabelled source, tests/test_unlabelled.py)
    cases = {"missing": (base / "nowhere", base / "o1"), "dst under a file": (src, base / "a_file" / "out"),
             "dst read-only": (src, base / "readonly" / "out")}
    procs = {k: start_viewpipe("convert", s, d, *OPTS, "--format", "dali") for k, (s, d) in cases.items()}
    return {k: (_finish(p), cases[k][1]) for k, p in procs.items()}


def _job_npz(base: Path) -> dict[str, Any]:
    npz = base / "tiny.npz"
    arrays = _build_npz(npz)
    dsts = {split: base / split for split in NPZ_FILES}
    procs = {s: start_viewpipe("convert", npz, dsts[s], "--split", s, "--workers", "1", "--max-side", "24",
                               "--format", NPZ_FORMAT[s]) for s in NPZ_FILES}
    missing = viewpipe("convert", npz, base / "test", "--split", "test")
    return {"npz": npz, "arrays": arrays, "dsts": dsts, "runs": {s: _finish(p) for s, p in procs.items()},
            "missing": missing, "missing_dst": base / "test"}


# the max-side folder: (height, width) per image, one larger than the FFCV default on its longer side
BIG_SIZES = [(420, 640), (120, 90), (530, 300)]


def _job_max_side(base: Path) -> dict[str, Any]:
    """Conversions of a folder with images above and below the FFCV default side: the default (both formats),
    --max-side 0 (both formats), and a DALI-only one with the default; then a --resume of the finished
    natural-size one without --max-side (it keeps the side it was started with)."""
    src = base / "src"
    (src / "a").mkdir(parents=True)
    for i, (h, w) in enumerate(BIG_SIZES):
        (src / "a" / f"{i}.jpg").write_bytes(_encode(_gradient(h, w, i)))
    procs = {"default": start_viewpipe("convert", src, base / "default", "--workers", "1"),
             "keep": start_viewpipe("convert", src, base / "keep", "--workers", "1", "--max-side", "0"),
             "dali": start_viewpipe("convert", src, base / "dali", "--workers", "1", "--format", "dali")}
    runs = {k: _finish(p) for k, p in procs.items()}
    runs["resume_keep"] = viewpipe("convert", src, base / "keep", "--workers", "1", "--resume")
    runs["negative"] = viewpipe("convert", src, base / "negative", "--max-side", "-1")
    return {"base": base, "runs": runs}


INTERRUPTS = [(signal.SIGINT, "shards"), (signal.SIGKILL, "ffcv")]


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Expected]:
    root = tmp_path_factory.mktemp("bad") / "src"
    return root, _build_bad_folder(root)


@pytest.fixture(scope="module", autouse=True)
def jobs(bad, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    src, _ = bad
    base = tmp_path_factory.mktemp("jobs")
    for name in ("verify", "fatal", "npz", "max_side"):
        (base / name).mkdir()
    j = Jobs()
    j.start("converted", viewpipe, "convert", src, base / "converted", *OPTS)  # the uninterrupted reference
    for sig, stage in INTERRUPTS:
        j.start(f"interrupt-{stage}", _job_interrupt, src, base / f"int_{stage}", sig, stage)
    j.start("verify", _job_verify, j, base / "converted", base / "verify")
    j.start("disk", _job_disk_full, src, base / "disk", base / "disk_ref")
    j.start("fatal", _job_fatal, src, base / "fatal")
    j.start("npz", _job_npz, base / "npz")
    j.start("max_side", _job_max_side, base / "max_side")
    j.base = base  # type: ignore[attr-defined]
    yield j
    j.join()


@pytest.fixture(scope="module")
def converted(jobs: Jobs) -> Path:
    _ok(jobs.get("converted"))
    return jobs.base / "converted"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def converted_ffcv(converted: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _ffcv_read(converted / "data.beton")


# ---------------------------------------------------------------------------- 1. every bad kind
def test_report_lists_every_bad_file_once(bad, converted: Path) -> None:
    src, exp = bad
    report = _report(converted)
    assert report["complete"] is True
    files = [s["file"] for s in report["skipped"]]
    assert sorted(files) == sorted(exp.skipped), "every bad file listed, each once"
    for s in report["skipped"]:
        assert s["reason"].startswith(exp.skipped[s["file"]]), s
    assert report["files_seen"] == len(exp.samples) + len(exp.skipped)
    assert report["samples_written"] == len(exp.samples)
    assert report["files_skipped"] == len(exp.skipped)
    assert report["files_seen"] == report["samples_written"] + report["files_skipped"]
    assert report["skipped_by_reason"] == {"truncated or corrupt": 1, "empty file": 1, "not an image": 1,
                                           "too large": 1, "cannot read": 2, "not in a class folder": 1}
    assert report["empty_classes"] == ["beta"]
    assert report["classes"] == len(CLASSES)
    assert [c["file"] for c in report["converted"]] == [str(src / "alpha/00_cmyk.jpg")]
    assert "CMYK" in report["converted"][0]["conversion"]
    assert not (converted / ".work").exists() and not list(converted.rglob("*.tmp"))


def test_index_classes_labels_sizes(bad, converted: Path) -> None:
    src, exp = bad
    index = DatasetIndex.load(converted)
    assert index.classes == CLASSES == sorted(p.name for p in src.iterdir() if p.is_dir())
    assert (converted / "classes.txt").read_text() == "".join(f"{i}\t{c}\n" for i, c in enumerate(CLASSES))
    assert [s.decode() for s in index.sources] == [s["file"] for s in exp.samples]
    np.testing.assert_array_equal(index.labels, [s["label"] for s in exp.samples])
    assert set(index.labels.tolist()) == {0, 2, 3}  # delta 2 and gamma 3: the empty beta keeps 1
    np.testing.assert_array_equal(index.heights, [s["height"] for s in exp.samples])
    np.testing.assert_array_equal(index.widths, [s["width"] for s in exp.samples])
    np.testing.assert_array_equal(index.shards, np.arange(len(index)) // 4)
    for k, s in enumerate(exp.samples):  # kept files are stored byte for byte, converted ones re-encoded
        stored = _shard_bytes(converted, index, k)
        assert (stored == Path(s["file"]).read_bytes()) != s["converted"], s["file"]
        img = open_image(stored)
        assert (img.height, img.width) == (s["height"], s["width"])
        assert Image.open(io.BytesIO(stored)).format == {"jpg": "JPEG", "png": "PNG"}[s["ext"]]
        if s["converted"]:
            assert Image.open(io.BytesIO(stored)).mode == "RGB"


# ---------------------------------------------------------------------------- 2. read back by ffcv and DALI
def test_ffcv_loader_reads_labels_sizes_and_pixels(bad, converted: Path, converted_ffcv) -> None:
    _, exp = bad
    index = DatasetIndex.load(converted)
    images, labels, sizes = converted_ffcv
    np.testing.assert_array_equal(labels, index.labels)
    np.testing.assert_array_equal(sizes, np.stack([index.heights, index.widths], 1))
    assert images.shape == (len(index), 16, 16, 3)
    for k, s in enumerate(exp.samples):  # orientation applied as PIL's exif_transpose does
        want = _center_crop_16(np.asarray(open_image(Path(s["file"]).read_bytes())))
        diff = np.abs(images[k].astype(int) - want.astype(int)).mean()
        assert diff < 6, (s["file"], diff)


def test_dali_reads_meta_labels_shapes_and_pixels(bad, converted: Path) -> None:
    _, exp = bad
    index = DatasetIndex.load(converted)
    samples = _dali_read(converted)
    assert len(samples) == len(index)
    for k, (meta, cls, img) in enumerate(samples):
        assert meta.dtype == np.int64 and meta.tolist() == [k, index.labels[k]]
        assert cls == index.labels[k]
        assert img.shape == (index.heights[k], index.widths[k], 3), exp.samples[k]["file"]
        want = np.asarray(open_image(_shard_bytes(converted, index, k)))  # DALI applies EXIF orientation too
        diff = np.abs(img.astype(int) - want.astype(int)).mean()
        assert diff < 3, (exp.samples[k]["file"], diff)


def test_verify_passes_then_fails_on_damage(jobs: Jobs, converted: Path) -> None:
    res = jobs.get("verify")
    n = len(DatasetIndex.load(converted))
    _ok(res["good"])
    assert f"verified {converted}: {n} samples (dali: {n} samples, ffcv: {n} samples)" in res["good"].stdout
    _one_line_error(res["no_shard"], "000001.tar")
    _one_line_error(res["bad_meta"], "000000.tar", "000000001")
    _one_line_error(res["incomplete"], "not a finished conversion")


# ---------------------------------------------------------------------------- 3. interrupt and resume
def _same_as_reference(dst: Path, ref: Path) -> None:
    assert sorted(p.name for p in (dst / "wds").iterdir()) == sorted(p.name for p in (ref / "wds").iterdir())
    for p in (ref / "wds").iterdir():
        assert (dst / "wds" / p.name).read_bytes() == p.read_bytes(), p.name  # tars and idx, byte for byte
    a, b = DatasetIndex.load(dst), DatasetIndex.load(ref)
    for field in ("labels", "heights", "widths", "sources", "shards", "offsets", "nbytes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.classes == b.classes
    assert (dst / "classes.txt").read_bytes() == (ref / "classes.txt").read_bytes()
    ra, rb = _report(dst), _report(ref)
    assert ra["complete"] is True
    for key in ("files_seen", "samples_written", "files_skipped", "skipped", "skipped_by_reason", "converted",
                "empty_classes", "options"):
        assert ra[key] == rb[key], key
    assert not (dst / ".work").exists() and not list(dst.rglob("*.tmp"))


@pytest.mark.parametrize("sig, stage", INTERRUPTS, ids=["ctrl-c-in-shards", "kill-9-in-ffcv"])
def test_interrupt_then_resume_equals_uninterrupted(jobs: Jobs, converted: Path, converted_ffcv, sig: int,
                                                    stage: str) -> None:
    seen = jobs.get(f"interrupt-{stage}")
    n_shards = len(list((converted / "wds").glob("*.idx")))
    # really interrupted mid-way: no complete report, the stage unfinished
    _not_complete(seen["report"])
    if stage == "shards":
        assert 0 < seen["idx"] < n_shards, seen["idx"]
        assert not seen["beton"] and not seen["beton_tmp"]
    else:
        assert seen["idx"] == n_shards and seen["beton_tmp"] and not seen["beton"]
    if sig == signal.SIGINT:
        assert seen["rc"] == 130, seen["stderr"]
        assert "Traceback" not in seen["stderr"]
        lines = seen["stderr"].strip().splitlines()
        assert lines and "rerun with --resume" in lines[-1], lines
        _one_line_error(seen["rerun"], "--resume")  # a plain rerun into the interrupted folder is refused
        _not_complete(seen["report_after_rerun"])
    else:
        assert seen["rc"] == -signal.SIGKILL

    _ok(seen["resume"])
    dst = jobs.base / f"int_{stage}"  # type: ignore[attr-defined]
    _same_as_reference(dst, converted)
    images, labels, sizes = _ffcv_read(dst / "data.beton")
    ref_images, ref_labels, ref_sizes = converted_ffcv
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(sizes, ref_sizes)
    np.testing.assert_array_equal(images, ref_images)


# ---------------------------------------------------------------------------- 4. fatal conditions
@pytest.mark.parametrize("case, needles", [
    ("missing", ["nowhere", "no such file or folder"]),
    ("dst under a file", ["a_file/out", "cannot write there", "Not a directory"]),
    ("dst read-only", ["readonly/out", "cannot write there", "Permission denied"]),
])
def test_fatal_conditions_are_one_line(jobs: Jobs, case: str, needles: list[str]) -> None:
    res, dst = jobs.get("fatal")[case]
    _one_line_error(res, *needles)
    assert not dst.exists()


def test_disk_full_then_resume(jobs: Jobs) -> None:
    seen = jobs.get("disk")
    _one_line_error(seen["full"], "no space left", "--resume")
    _not_complete(seen["report"])
    assert seen["probed"] and seen["tar_tmp"] == 1 and seen["idx"] == 0, "the limit must hit the first shard"
    _one_line_error(seen["other_options"], "other options")  # resuming with other options is refused
    _not_complete(seen["report_after_refusal"])
    _ok(seen["resume"])
    _ok(seen["ref"])
    dst, ref = jobs.base / "disk", jobs.base / "disk_ref"  # type: ignore[attr-defined]
    _same_as_reference(dst, ref)
    assert not (dst / "data.beton").exists()
    _one_line_error(seen["finished_other_options"], "other options")  # also once finished


# ---------------------------------------------------------------------------- 5, 6. .npz sources, --format, --max-side
def _scaled_24(h: int, w: int) -> tuple[int, int]:
    """FFCV's resizer (which --max-side follows): floor of ratio × size."""
    r = 24 / max(h, w)
    return (int(r * h), int(r * w)) if r < 1 else (h, w)


@pytest.mark.parametrize("split", ["train", "val"])
def test_npz_split_format_and_max_side(jobs: Jobs, split: str) -> None:
    job = jobs.get("npz")
    _ok(job["runs"][split])
    npz, arrays, dst = job["npz"], job["arrays"], job["dsts"][split]
    entries = NPZ_FILES[split]
    keep = [i for i, e in enumerate(entries) if e[2] != "empty"]
    want = [_scaled_24(*((w, h) if kind in ("rot6", "rot8") else (h, w))) for h, w, kind in (entries[i] for i in keep)]
    name = [f"{npz}[{split}][{i}] ({split}/x{i}.jpg)" for i in range(len(entries))]
    index = DatasetIndex.load(dst)
    assert index.classes == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(index.labels, arrays[f"{split}_labels"][keep])
    assert list(zip(index.heights.tolist(), index.widths.tolist())) == want
    assert max(index.heights.max(), index.widths.max()) == 24
    assert [s.decode() for s in index.sources] == [name[i] for i in keep]

    report = _report(dst)
    assert report["complete"] and report["options"]["split"] == split
    assert report["files_seen"] == len(entries) == report["samples_written"] + report["files_skipped"]
    assert report["samples_written"] == len(keep)
    assert report["skipped"] == [{"file": name[i], "reason": "empty file (0 bytes)"}
                                 for i, e in enumerate(entries) if e[2] == "empty"]
    conv = {c["file"]: c["conversion"] for c in report["converted"]}
    want_conv = {name[i]: (entries[i][2], want[k]) for k, i in enumerate(keep)
                 if entries[i][2] == "cmyk" or max(want[k]) < max(entries[i][:2])}
    assert set(conv) == set(want_conv) and len(want_conv) >= 2
    for f, (kind, (h, w)) in want_conv.items():
        assert ("CMYK" in conv[f]) if kind == "cmyk" else (f"to {w}x{h} (--max-side 24)" in conv[f]), conv[f]

    if NPZ_FORMAT[split] == "dali":
        assert not (dst / "data.beton").exists()
        samples = _dali_read(dst)
        assert [m.tolist() for m, _, _ in samples] == [[k, index.labels[k]] for k in range(len(index))]
        assert [img.shape for _, _, img in samples] == [(h, w, 3) for h, w in want]
        off = arrays[f"{split}_offsets"]
        for k, i in enumerate(keep):  # untouched files are stored byte for byte, converted ones re-encoded
            original = arrays[f"{split}_jpeg"][off[i] : off[i + 1]].tobytes()
            assert (_shard_bytes(dst, index, k) == original) != (name[i] in want_conv), i
    else:
        assert not (dst / "wds").exists() and (index.shards == -1).all()
        _, labels, sizes = _ffcv_read(dst / "data.beton")
        np.testing.assert_array_equal(labels, index.labels)
        assert [tuple(s) for s in sizes.tolist()] == want


def test_npz_missing_split_is_one_line(jobs: Jobs) -> None:
    job = jobs.get("npz")
    _one_line_error(job["missing"], "no split 'test'", "train", "val")
    assert not job["missing_dst"].exists()


# ---------------------------------------------------------------------------- 7. the FFCV default side, --help
def test_ffcv_conversions_default_to_ffcv_imagenets_side(jobs: Jobs) -> None:
    """A conversion that writes FFCV downscales to a longer side of 500 (ffcv-imagenet's max_resolution) by
    default, in the FFCV file and the shards alike (one index, one size per sample); --max-side 0 keeps natural
    size; a DALI-only conversion keeps natural size by default; --resume keeps the side it was started with."""
    from viewpipe.convert import FFCV_MAX_SIDE

    job = jobs.get("max_side")
    base, runs = job["base"], job["runs"]
    for name in ("default", "keep", "dali", "resume_keep"):
        _ok(runs[name])
    assert FFCV_MAX_SIDE == 500
    natural = BIG_SIZES
    scaled = [_scaled_to(h, w, FFCV_MAX_SIDE) for h, w in BIG_SIZES]
    assert max(max(hw) for hw in scaled) == FFCV_MAX_SIDE and scaled[1] == natural[1]
    for name, want, max_side in (("default", scaled, FFCV_MAX_SIDE), ("keep", natural, 0), ("dali", natural, 0)):
        dst = base / name
        index = DatasetIndex.load(dst)
        assert list(zip(index.heights.tolist(), index.widths.tolist())) == want, name
        assert _report(dst)["options"]["max_side"] == max_side, name
        if name != "dali":
            _, _, sizes = _ffcv_read(dst / "data.beton")
            assert [tuple(hw) for hw in sizes.tolist()] == want, name
        assert [img.shape[:2] for _, _, img in _dali_read(dst)] == want, name
    assert not (base / "dali" / "data.beton").exists()
    assert "converted" in runs["resume_keep"].stdout
    _one_line_error(runs["negative"], "--max-side", "0 (keep natural size)")


def _scaled_to(h: int, w: int, side: int) -> tuple[int, int]:
    """FFCV's resizer (which --max-side follows): floor of ratio × size."""
    r = side / max(h, w)
    return (int(r * h), int(r * w)) if r < 1 else (h, w)


def test_help_shows_every_default_and_the_ffcv_source() -> None:
    """`viewpipe convert --help`: every option's help says its default; the FFCV side names its source."""
    import argparse

    from viewpipe.tools import convert as command

    parser = argparse.ArgumentParser(prog="viewpipe")
    command.add_parser(parser.add_subparsers())
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = [a for a in sub.choices["convert"]._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 10
    for action in options:
        assert "default" in (action.help or ""), action.option_strings
    res = viewpipe("convert", "--help")
    _ok(res)
    text = " ".join(res.stdout.split())
    assert "(default: 500 when an FFCV file is written" in text and "write_imagenet.sh 500 0.50 90" in text
    assert "(default: 90, as ffcv-imagenet)" in text and "(default: both)" in text


def test_the_command_modules_import_without_torch() -> None:
    """`viewpipe convert` and `viewpipe bench` parse their arguments without importing torch, DALI or ffcv."""
    res = subprocess.run([sys.executable, "-c", "import sys, viewpipe.tools.convert, viewpipe.tools.bench; "
                          "print(sorted(m for m in ('torch', 'nvidia.dali', 'ffcv') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr)
