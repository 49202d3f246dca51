"""`viewpipe bench --soak`: many short training epochs in this process, each with a ContrastiveCrop box update
(`ccrop.warmup=0`, `ccrop.interval=1`) and a CsMl neighbour mining (`interval: 1`), on a small generated image
folder (resnet_tiny, 32 px views, the CPU unless --soak-device says otherwise); after every epoch the process's
resident memory, open file descriptors, threads, child processes and viewpipe shared-memory segments
(/dev/shm/viewpipe.*, and their bytes) are sampled. Reported: each one's least-squares slope per epoch after
the warm-up epochs (allocator and caches settling), and which of them grow: any of the counts rising from the
end of the warm-up to the last epoch, or memory by more than `RSS_MB_PER_EPOCH` a epoch."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RSS_MB_PER_EPOCH = 0.5  # a slope above this (MB per epoch, after the warm-up) is reported as growth
COUNTS = ("fds", "threads", "children", "segments", "mapped_segments", "segment_mb")


def sample() -> dict[str, float]:
    """This process's RSS (MB), open fds, OS threads and child processes; the viewpipe segments it created (named
    after its pid; other runs on the machine have their own) in the shared-memory folder (count, MB), and the
    viewpipe segments it maps (removed ones included: a mapping kept after close is a leak too)."""
    from viewpipe.segments import PREFIX, SHM_DIR
    from viewpipe.workers import children_of

    pid = os.getpid()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    segments = [p for p in SHM_DIR.glob(f"{PREFIX}{pid}-*") if p.is_file()]
    where = f"{SHM_DIR}/{PREFIX}"
    mapped = {line.split(None, 5)[5] for line in Path("/proc/self/maps").read_text().splitlines()
              if where in line}
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"]), "children": len(children_of(pid)), "segments": len(segments),
            "mapped_segments": len(mapped), "segment_mb": sum(p.stat().st_size for p in segments) / 2**20}


def slopes(samples: list[dict[str, float]], warmup: int) -> dict[str, float]:
    """The least-squares slope per epoch of every sampled figure over the epochs after `warmup`."""
    tail = samples[warmup:]
    if len(tail) < 2:
        return {}
    x = np.arange(len(tail), dtype=np.float64)
    return {k: float(np.polyfit(x, [s[k] for s in tail], 1)[0]) for k in tail[0]}


def growing(samples: list[dict[str, float]], warmup: int, slope: dict[str, float]) -> list[str]:
    """The figures that grow after the warm-up: a count higher at the last epoch than at the end of the warm-up
    and still rising (positive slope), or memory rising faster than `RSS_MB_PER_EPOCH`."""
    if len(samples) <= warmup + 1:
        return []
    first, last = samples[warmup], samples[-1]
    out = [k for k in COUNTS if last[k] > first[k] and slope.get(k, 0) > 0]
    return out + (["rss_mb"] if slope.get("rss_mb", 0) > RSS_MB_PER_EPOCH else [])


def soak_overrides(data: Path, out: Path, epochs: int, workers: int, backend: str, device: str) -> list[str]:
    """The run's config overrides: CsMl (mining before every epoch) with ContrastiveCrop boxes updated after
    every epoch, resnet_tiny, 32 px views, batches of 16, no kNN."""
    return [f"data.path={data}", f"data.backend={backend}", "backbone=resnet_tiny", f"epochs={epochs}",
            "data.batch_size=16", f"data.workers={workers}", "data.size=32", "method=csml",
            "method_args={queue: 64, k: 3, interval: 1, switch_epoch: 1}", "ccrop.enabled=true", "ccrop.warmup=0",
            "ccrop.interval=1", f"out={out}", "log_every=1000", "optim.lr=0.05", f"device={device}",
            "channels_last=false", "knn_every=0", "logger=none"]


def soak(epochs: int, workers: int = 0, images: int = 96, backend: str = "torch", device: str = "cpu",
         warmup: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train `epochs` epochs of the soak run on `images` generated images and sample after each (see the module);
    returns the samples, the slopes after `warmup` epochs (default: a quarter of them, at least 2) and the
    figures that grow."""
    from tqdm import tqdm

    from viewpipe.synthetic import make_folder
    from viewpipe.trainers.config import load_config
    from viewpipe.trainers.engine import Trainer

    warmup = max(2, epochs // 4) if warmup is None else warmup
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="viewpipe-soak-") as tmp:
        data = make_folder(Path(tmp) / "images", n=images, size_range=(40, 64))
        cfg = load_config(None, soak_overrides(data, Path(tmp) / "run", epochs, workers, backend, device))
        samples.append(sample())  # before the trainer
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        bar = tqdm(total=epochs, desc="soak", unit="epoch", leave=False, disable=not progress or None)
        end_epoch = trainer._end_epoch

        def sampled_end(run: Any) -> None:
            end_epoch(run)
            samples.append(sample() | {"epoch": run.epoch})
            bar.update(1)

        trainer._end_epoch = sampled_end  # type: ignore[method-assign]
        try:
            trainer.fit()
            updates = [r for r in trainer.history if "box_update" in json.dumps(r)]
        finally:
            trainer.close()
            bar.close()
        seconds = time.perf_counter() - t0
        after = sample()
    per_epoch = [{k: v for k, v in s.items() if k != "epoch"} for s in samples[1:]]
    slope = slopes(per_epoch, warmup)
    return {"epochs": epochs, "images": images, "workers": workers, "backend": backend, "device": device,
            "warmup": warmup, "seconds": seconds, "before": samples[0], "after_close": after, "samples": per_epoch,
            "slope_per_epoch": slope, "growing": growing(per_epoch, warmup, slope),
            "history_keys": sorted({k for r in updates for k in r}) if updates else []}


def table(r: dict[str, Any]) -> str:
    """The first and last samples after the warm-up, the slope per epoch and whether it grows, per figure."""
    first, last = r["samples"][r["warmup"]], r["samples"][-1]
    lines = [f"{'':18s} {'before':>10s} {'epoch ' + str(r['warmup']):>10s} {'last epoch':>10s} "
             f"{'per epoch':>11s} {'after close':>11s}"]
    for k in first:
        flag = "  GROWS" if k in r["growing"] else ""
        lines.append(f"{k:18s} {r['before'][k]:10.2f} {first[k]:10.2f} {last[k]:10.2f} "
                     f"{r['slope_per_epoch'].get(k, 0.0):+11.4f} {r['after_close'][k]:11.2f}{flag}")
    return "\n".join(lines)


def main(args: Any) -> int:
    """`viewpipe bench --soak`: the soak run of --soak-epochs epochs (--workers loader workers, --backend's first
    or torch); the table, and the JSON file (--report)."""
    from viewpipe.errors import ViewpipeError
    from viewpipe.tools.bench import machine

    if args.soak_epochs < 4:
        raise ViewpipeError(f"--soak-epochs must be at least 4 (2 warm-up epochs and a slope), got {args.soak_epochs}")
    backend = (args.backend or ["torch"])[0]
    r = soak(args.soak_epochs, workers=args.workers, backend=backend)
    r["machine"] = machine()
    print(f"viewpipe bench --soak: {r['epochs']} epochs of CsMl (mining before each) + ContrastiveCrop (box update "
          f"after each), {r['images']} images, {backend} backend, {r['workers']} workers, {r['seconds']:.0f} s; "
          f"slopes after {r['warmup']} warm-up epochs")
    print(f"machine: {r['machine']}")
    print(table(r))
    print("growing: " + (", ".join(r["growing"]) if r["growing"] else "nothing"))
    report = Path(args.report or "bench-soak.json")
    report.write_text(json.dumps(r, indent=1))
    print(f"figures: {report}")
    return 1 if r["growing"] else 0
