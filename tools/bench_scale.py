"""`viewpipe bench --scale`: ImageNet scale, measured (no real images needed).

1. The dataset index of a conversion of `--scale-samples` samples (default ImageNet's 1,281,167): synthetic
   entries of ImageNet's shape (labels, sizes, source paths, shards of 10,000, offsets, byte counts, both
   checksums) saved and loaded as `viewpipe convert` writes them, and opened as a `ShardSource` (its sizes);
   its size on disk.
2. The `SampleState` of that many samples with boxes, 7×7 heatmaps and 5 neighbours: create, attach (here and
   from another process), a full update of each table, the process's RSS and the segment's /dev/shm bytes.
3. A full epoch planned for each of 8 ranks (batch 256 per rank, boxes on) with the real planner
   (`epoch_batches`, `Planner.plan`): the epoch order's cost and the per-batch planning cost.

Each operation is also run at 1/8 of the size, and the growth exponent log(t / t_small) / log 8 reported: 1 is
linear (per-batch costs: 0 is flat). `--scale-files N` instead (or as well) lists and probes folder trees of
N/4, N/2 and N tiny JPEGs in 1000 class folders (`FolderSource`, the conversion's fingerprint, probe and resumed
re-listing), fits the exponent and extrapolates linearly to ImageNet's 1,281,167 files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

IMAGENET = 1_281_167
SHARD = 10_000  # samples per shard (convert's default shard_size)
RANKS, BATCH = 8, 256
HEATMAP, NEIGHBOURS = 7, 5
_ATTACH = """
import json, sys, time
t0 = time.perf_counter()
from viewpipe.state import SampleState
t1 = time.perf_counter()
st = SampleState.attach(sys.argv[1])
t2 = time.perf_counter()
boxes = st.boxes()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "attach_s": t2 - t1, "read_boxes_s": t3 - t2}))
"""


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), its wall time in seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rss_mb() -> float:
    """This process's resident set size, MB (/proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_index(n: int, seed: int = 0) -> Any:
    """A `DatasetIndex` of n samples shaped as a converted ImageNet's: 1000 classes, ImageNet-like sizes, source
    paths `.../train/nXXXXXXXX/nXXXXXXXX_I.JPEG`, shards of 10,000, offsets and byte counts, both checksums."""
    from viewpipe.formats import DatasetIndex

    rng = np.random.default_rng(seed)
    labels = (np.arange(n) * 1000 // n).astype(np.int64)
    wnids = np.array([f"n{1440764 + 1000 * c:08d}" for c in range(1000)])
    sources = np.char.add(np.char.add(np.char.add("/data/imagenet/train/", wnids[labels]), "/"),
                          np.char.add(np.char.add(wnids[labels], "_"), np.arange(n).astype("U8")))
    sources = np.char.encode(np.char.add(sources, ".JPEG"), "ascii")
    nbytes = rng.integers(20_000, 200_000, n).astype(np.int64)
    shard = (np.arange(n) // SHARD).astype(np.int32)
    offsets = np.zeros(n, np.int64)
    for s in range(int(shard[-1]) + 1):  # each shard's images one after another (tar headers ignored)
        sel = slice(s * SHARD, min((s + 1) * SHARD, n))
        offsets[sel] = np.cumsum(nbytes[sel] + 1536) - nbytes[sel]
    return DatasetIndex(labels=labels, heights=rng.choice([375, 500, 333], n).astype(np.int32),
                        widths=rng.choice([500, 375, 500], n).astype(np.int32), sources=sources, shards=shard,
                        offsets=offsets, nbytes=nbytes, classes=list(wnids),
                        checksums=rng.integers(0, 2**32, n, dtype=np.uint32),
                        ffcv_checksums=rng.integers(0, 2**32, n, dtype=np.uint32))


def index_rows(n: int, root: Path) -> dict[str, float]:
    """Build, save and load the synthetic index of n samples in `root`, open it as a ShardSource."""
    from viewpipe.formats import INDEX, DatasetIndex
    from viewpipe.sources import ShardSource

    index, build_s = timed(lambda: synthetic_index(n))
    _, save_s = timed(lambda: index.save(root))
    loaded, load_s = timed(lambda: DatasetIndex.load(root))
    source, open_s = timed(lambda: ShardSource(root))
    assert len(loaded) == n and source.sizes.shape == (n, 2)
    return {"index_build_s": build_s, "index_save_s": save_s, "index_load_s": load_s, "shard_source_open_s": open_s,
            "index_mb": (root / INDEX).stat().st_size / 2**20,
            "index_in_memory_mb": sum(getattr(loaded, k).nbytes for k in ("labels", "heights", "widths", "sources",
                                                                         "shards", "offsets", "nbytes", "checksums",
                                                                         "ffcv_checksums")) / 2**20}


def attach_elsewhere(name: str) -> dict[str, float]:
    """Attach to the state `name` from a fresh Python process and read its boxes there: that process's times."""
    child = subprocess.run([sys.executable, "-c", _ATTACH, name], capture_output=True, text=True, timeout=600)
    if child.returncode:
        raise RuntimeError(f"the attaching process failed: {child.stderr.strip()[-500:]}")
    return json.loads(child.stdout)


def state_rows(n: int, other_process: bool = True) -> tuple[Any, dict[str, float]]:
    """Create the state of n samples (boxes, 7×7 heatmaps, 5 neighbours), attach to it, publish a full update of
    each table; returns the state (open, for the planner) and the figures."""
    from viewpipe.state import SampleState

    rng = np.random.default_rng(1)
    lo = rng.uniform(0, 0.4, (n, 2)).astype(np.float32)
    boxes = np.concatenate([lo, lo + 0.5], 1)
    heat = rng.integers(0, 256, (n, HEATMAP, HEATMAP), dtype=np.uint8)
    nb = rng.integers(0, n, (n, NEIGHBOURS), dtype=np.int32)
    before = rss_mb()
    st, create_s = timed(lambda: SampleState.create(n, heatmap_size=HEATMAP, neighbours=NEIGHBOURS))
    r = {"state_create_s": create_s}
    reader, r["state_attach_s"] = timed(lambda: SampleState.attach(st.name))
    reader.close()
    if other_process:
        r.update({f"other_process_{k}": v for k, v in attach_elsewhere(st.name).items()})
    _, r["publish_boxes_s"] = timed(lambda: st.set_boxes(boxes))
    _, r["publish_heatmaps_s"] = timed(lambda: st.set_heatmaps(heat, input_size=(224, 224)))
    _, r["publish_neighbours_s"] = timed(lambda: st.set_neighbours(nb))
    st.set_derived_boxes(boxes, st.threshold)  # as after a box pass: the planner reads the table
    _, r["read_all_boxes_s"] = timed(lambda: st.boxes())
    stat = os.stat(st.path)
    r["shm_mb"] = stat.st_size / 2**20
    r["shm_resident_mb"] = stat.st_blocks * 512 / 2**20
    r["rss_growth_mb"] = rss_mb() - before  # the segment's pages this process touched, and the input arrays
    return st, r


def plan_rows(n: int, state: Any, sizes: np.ndarray, ranks: int = RANKS, batch: int = BATCH,
              progress: bool = True) -> dict[str, float]:
    """A full epoch planned for each of `ranks` ranks (batch `batch` per rank, ContrastiveCrop boxes on): the
    epoch order's time per rank and the per-batch planning time."""
    from tqdm import tqdm

    from viewpipe.augment import preset
    from viewpipe.crop import CropConfig
    from viewpipe.pipelines import LoaderConfig, epoch_batches
    from viewpipe.pipelines.plan import Planner, Substitutes

    cfg = LoaderConfig(views=2, batch_size=batch, crop=CropConfig(use_box=True), augment=preset("mocov2", size=224))
    order_s = plan_s = 0.0
    planned = 0
    bar = tqdm(total=ranks * (n // ranks // batch), desc=f"plan {n} samples × {ranks} ranks", unit="batch",
               leave=False, disable=not progress or None)
    for rank in range(ranks):
        batches, t = timed(lambda rank=rank: epoch_batches(n, cfg, 1, rank, ranks))
        order_s += t
        planner = Planner(cfg, rank, state, Substitutes(n, str), lambda i: sizes[i])
        t0 = time.perf_counter()
        for b, indices in enumerate(batches):
            planner.plan(1, b, indices)
            bar.update(1)
        plan_s += time.perf_counter() - t0
        planned += len(batches)
    bar.close()
    return {"epoch_order_per_rank_s": order_s / ranks, "plan_epoch_s": plan_s, "batches_planned": planned,
            "plan_per_batch_ms": plan_s / max(planned, 1) * 1e3}


def scale_run(n: int, progress: bool = True, other_process: bool = True) -> dict[str, float]:
    """Index, state and planner figures at n samples (`index_rows`, `state_rows`, `plan_rows`)."""
    from viewpipe.formats import DatasetIndex

    with tempfile.TemporaryDirectory(prefix="viewpipe-scale-") as tmp:
        r: dict[str, float] = {"n": n}
        r.update(index_rows(n, Path(tmp)))
        index = DatasetIndex.load(tmp)
        sizes = np.stack([index.heights, index.widths], 1).astype(np.int64)
        del index
    st, figures = state_rows(n, other_process)
    r.update(figures)
    try:
        r.update(plan_rows(n, st, sizes, progress=progress))
        r["rss_mb"] = rss_mb()
    finally:
        st.close()
    return r


def growth(small: dict[str, float], big: dict[str, float]) -> dict[str, float]:
    """The growth exponent of every timed figure between two runs: log(t_big / t_small) / log(n_big / n_small)
    (1: linear; per-batch figures: 0, flat)."""
    ratio = big["n"] / small["n"]
    return {k: math.log(big[k] / small[k]) / math.log(ratio) for k in big
            if k.endswith(("_s", "_ms")) and small.get(k, 0) > 0 and big[k] > 0 and not k.startswith("other_process")}


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    """The least-squares slope of log t against log n: the exponent of t ∝ n^k."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


# ---------------------------------------------------------------------------------------- folder listing
def tiny_jpeg() -> bytes:
    """A small valid JPEG (16×16), the file every entry of the generated trees links to."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_tree(root: Path, files: int, classes: int = 1000, progress: bool = True) -> Path:
    """`files` hard links of one tiny JPEG spread over `classes` class folders of `root` (copies where the file
    system has no hard links)."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    seed = root / ".seed.jpg"
    seed.write_bytes(tiny_jpeg())
    link: Callable[[Path, Path], Any] = os.link
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(exist_ok=True)
    for i in tqdm(range(files), desc=f"tree of {files} files", unit="file", leave=False,
                  disable=not progress or None):
        dst = root / f"n{i % classes:08d}" / f"n{i % classes:08d}_{i}.JPEG"
        try:
            link(seed, dst)
        except OSError:
            link = shutil.copyfile
            link(seed, dst)
    seed.unlink()
    return root


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the probe workers), user + system: less sensitive than
    wall time to a machine shared with other work, so the growth exponents are fitted on it."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


STAGES = ("list", "fingerprint", "prepare", "probe", "resume_relist")


def listing_rows(root: Path, work_root: Path, workers: int) -> dict[str, float]:
    """List `root` as `viewpipe convert` does (`FolderSource`, every file), fingerprint it, probe every file (the
    conversion's probe stage, journaled), then resume: list again, check the listing, read the journal back.
    Each stage's wall (`<stage>_s`) and CPU seconds (`<stage>_cpu_s`, the probe workers' included)."""
    from viewpipe import convert as conv
    from viewpipe.formats import DEFAULT_MAX_PIXELS

    options = {"formats": ["dali"], "split": "train", "max_side": 0, "max_pixels": DEFAULT_MAX_PIXELS,
               "ffcv_mode": "jpg", "jpeg_quality": 90, "shard_size": SHARD}
    dst = work_root / f"converted-{root.name}"
    work = dst / conv.WORK
    r: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t, c = time.perf_counter(), cpu_seconds()
        out = fn()
        r[f"{name}_s"], r[f"{name}_cpu_s"] = time.perf_counter() - t, cpu_seconds() - c
        return out

    def resume() -> None:
        again = conv.open_convert_source(root, "train")
        conv._prepare(root, dst, work, again, options, resume=True)
        conv._probe_all(again, work, workers, DEFAULT_MAX_PIXELS, 0)

    source = stage("list", lambda: conv.open_convert_source(root, "train"))
    stage("fingerprint", lambda: conv._fingerprint(source))
    stage("prepare", lambda: conv._prepare(root, dst, work, source, options, resume=False))
    records = stage("probe", lambda: conv._probe_all(source, work, workers, DEFAULT_MAX_PIXELS, 0))
    assert len(records) == len(source) and not any(rec[4] for rec in records), "a generated file was skipped"
    stage("resume_relist", resume)
    shutil.rmtree(dst, ignore_errors=True)
    return {"files": len(source), **r}


def folder_run(files: int, workers: int, sizes: tuple[float, ...] = (0.25, 0.5, 1.0), progress: bool = True,
               where: str | None = None) -> dict[str, Any]:
    """`listing_rows` on trees of each `sizes` share of `files` (made, timed, removed one at a time), the
    exponent of each stage fitted over them, and the largest one's times extrapolated linearly to ImageNet."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="viewpipe-scale-files-", dir=where) as tmp:
        for share in sizes:
            count = max(int(files * share), 1)
            root = make_tree(Path(tmp) / f"tree-{count}", count, min(1000, count), progress)
            rows.append(listing_rows(root, Path(tmp), workers))
            shutil.rmtree(root)
    ns = [r["files"] for r in rows]
    out: dict[str, Any] = {"rows": rows, "workers": workers}
    if len(rows) > 1:  # fitted on CPU seconds (see `cpu_seconds`)
        out["exponent"] = {s: fit_exponent(ns, [max(r[f"{s}_cpu_s"], 1e-6) for r in rows]) for s in STAGES}
    out["imagenet_s"] = {s: rows[-1][f"{s}_s"] * IMAGENET / ns[-1] for s in STAGES}
    return out


# ---------------------------------------------------------------------------------------- the command
LABELS = {  # figure → (table label, unit)
    "index_build_s": ("synthetic index built", "s"), "index_save_s": ("index saved (index.npz)", "s"),
    "index_load_s": ("index loaded", "s"), "shard_source_open_s": ("ShardSource opened (sizes)", "s"),
    "index_mb": ("index.npz on disk", "MB"), "index_in_memory_mb": ("index in memory", "MB"),
    "state_create_s": ("state created", "s"), "state_attach_s": ("state attached (this process)", "s"),
    "other_process_attach_s": ("state attached (another process)", "s"),
    "other_process_read_boxes_s": ("all boxes read (another process)", "s"),
    "publish_boxes_s": ("set_boxes, full update", "s"), "publish_heatmaps_s": ("heatmaps published", "s"),
    "publish_neighbours_s": ("neighbours published", "s"), "read_all_boxes_s": ("all boxes read", "s"),
    "shm_mb": ("segment in /dev/shm", "MB"), "shm_resident_mb": ("segment resident in /dev/shm", "MB"),
    "rss_growth_mb": ("RSS growth for the state", "MB"), "epoch_order_per_rank_s": ("epoch order, per rank", "s"),
    "plan_epoch_s": ("full epoch planned, 8 ranks", "s"), "plan_per_batch_ms": ("per batch planned (256)", "ms"),
    "rss_mb": ("process RSS at the end", "MB"),
}


def scale_table(small: dict[str, float], big: dict[str, float], exps: dict[str, float]) -> str:
    """The figures at both sizes with their growth exponents."""
    head = f"{'':36s} {'n=' + format(int(small['n']), ','):>14s} {'n=' + format(int(big['n']), ','):>14s} {'exponent':>9s}"
    lines = [head]
    for k, (label, unit) in LABELS.items():
        if k in big:
            e = f"{exps[k]:9.2f}" if k in exps else f"{'-':>9s}"
            lines.append(f"{label + ' (' + unit + ')':36s} {small.get(k, float('nan')):14.4f} {big[k]:14.4f} {e}")
    return "\n".join(lines)


def folder_table(r: dict[str, Any]) -> str:
    """The listing stages at each tree size, their fitted exponents and the extrapolation to ImageNet."""
    lines = [f"{'files':>10s} " + " ".join(f"{s:>19s}" for s in STAGES) + "   (wall s / CPU s)"]
    for row in r["rows"]:
        lines.append(f"{row['files']:10,d} " + " ".join(f"{row[s + '_s']:9.2f} /{row[s + '_cpu_s']:8.2f}"
                                                         for s in STAGES))
    if "exponent" in r:
        lines.append(f"{'exponent':>10s} " + " ".join(f"{r['exponent'][s]:19.2f}" for s in STAGES) + "   (CPU)")
    lines.append(f"{'→1,281,167':>10s} " + " ".join(f"{r['imagenet_s'][s]:19.1f}" for s in STAGES) + "   (wall)")
    return "\n".join(lines)


def main(args: Any) -> int:
    """`viewpipe bench --scale`: the index, state and planner at --scale-samples and at 1/8 of it, then (with
    --scale-files > 0) the folder listing; a table and a JSON file (--report)."""
    from viewpipe.errors import ViewpipeError
    from viewpipe.tools.bench import machine

    n, files = args.scale_samples, args.scale_files
    if n < 8 * RANKS * BATCH and n:
        raise ViewpipeError(f"--scale-samples must be 0 (skip) or at least {8 * RANKS * BATCH} (1/8 of it fills a "
                            f"batch of {BATCH} on each of {RANKS} ranks), got {n}")
    if files < 0:
        raise ViewpipeError(f"--scale-files must be >= 0, got {files}")
    out: dict[str, Any] = {"machine": machine(), "cpus": len(os.sched_getaffinity(0))}
    print(f"viewpipe bench --scale; machine: {out['machine']}")
    if n:
        small, big = scale_run(n // 8), scale_run(n)
        out.update(small=small, big=big, exponent=growth(small, big))
        print(scale_table(small, big, out["exponent"]))
    if files:
        out["folder"] = folder_run(files, args.workers)
        print(f"folder listing and probe ({args.workers} probe workers), seconds:")
        print(folder_table(out["folder"]))
    report = Path(args.report or "bench-scale.json")
    report.write_text(json.dumps(out, indent=1))
    print(f"figures: {report}")
    return 0
