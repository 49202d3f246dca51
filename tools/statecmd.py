"""`viewpipe state show|set-threshold|bench`: look into a running run's sample state, change its heatmaps' box
threshold while it trains, and measure the state at ImageNet's scale."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from viewpipe.errors import ViewpipeError


def set_threshold(name: str, threshold: str | float) -> str:
    """Change the threshold of the state `name` (a segment name as `viewpipe state list` shows it) from outside
    its run: its loaders derive their boxes at it from their `prefetch`-th batch on. Returns the report line."""
    from viewpipe.state import SampleState

    try:
        t = float(threshold)
    except ValueError:
        raise ViewpipeError(f"set-threshold: {threshold!r} is not a number") from None
    old = SampleState.set_threshold_of(name, t)
    return f"sample state {name}: threshold {old:g} -> {t:g}; running loaders use it within their prefetch bound"


def show(name: str) -> str:
    """What the state `name` holds: its tables, version, epoch, and the heatmaps' threshold and input size."""
    from viewpipe.state import SampleState

    st = SampleState.attach(name)
    try:
        lines = [f"sample state {name}: {len(st)} samples, version {st.version}, epoch {st.epoch}"]
        shapes = {"boxes": (len(st), 4), "heatmaps": (len(st), st.layout.heatmap_size, st.layout.heatmap_size),
                  "neighbours": (len(st), st.layout.n_neighbours)}
        for t, shape in shapes.items():
            if st.has(t):
                bad = st.invalid_rows(t, total=True)
                lines.append(f"  {t}: {' x '.join(map(str, shape))}, {bad} invalid rows so far")
        if st.has("heatmaps"):
            size = st.input_size
            where = (f"published, upsampled to {size[0]}x{size[1]}: loaders derive boxes from them"
                     if st.heatmap_key() else "not published yet: loaders read the boxes table")
            lines.append(f"  threshold {st.threshold:g}; heatmaps {where}")
        return "\n".join(lines)
    finally:
        st.close()


def _blobs(n: int, k: int, seed: int = 0) -> np.ndarray:
    """n smooth uint8 heatmaps k×k (one Gaussian blob each, min-max normalised as the box pass makes them)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, k, k), np.uint8)
    g = np.arange(k, dtype=np.float32)
    for s in range(0, n, 65536):
        c = rng.uniform(0, k - 1, (min(65536, n - s), 2, 1)).astype(np.float32)
        sig = rng.uniform(0.5, k / 2, (len(c), 1, 1)).astype(np.float32)
        m = np.exp(-((g - c[:, :1]) ** 2)[:, :, :, None] / sig[..., None] ** 2
                   - ((g - c[:, 1:]) ** 2)[:, :, None, :] / sig[..., None] ** 2)[:, 0]
        lo, hi = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
        out[s : s + len(c)] = np.rint((m - lo) / np.maximum(hi - lo, 1e-12) * 255)
    return out


_READER = """
import json, resource, sys, time
import numpy as np
import torch  # (as in every loader process; its import is not the state's cost)
t0 = time.perf_counter()
from viewpipe.state import SampleState
from viewpipe.heatmap_boxes import LiveBoxes
t1 = time.perf_counter()
st = SampleState.attach(sys.argv[1])
t2 = time.perf_counter()
heat = st.heatmaps()
t3 = time.perf_counter()
boxes = LiveBoxes(st).boxes(np.arange(len(st)))
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "attach_s": t2 - t1, "read_heatmaps_s": t3 - t2, "derive_all_s": t4 - t3,
                  "box_area": float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()),
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(n: int, heatmap: int, neighbours: int, size: int) -> dict[str, Any]:
    """Create a state of n samples with boxes, heatmap×heatmap heatmaps and `neighbours` neighbours, publish a
    full update of each table, attach from another process and derive every box there (and here), change the
    threshold from outside: the times (s) and memory (MB)."""
    from viewpipe.heatmap_boxes import LiveBoxes
    from viewpipe.state import SampleState

    if n < 1 or heatmap < 1 or neighbours < 0 or size < 1:
        raise ViewpipeError("state bench: --n, --heatmap and --size must be >= 1, --neighbours >= 0")
    heat = _blobs(n, heatmap)
    lo = np.random.default_rng(1).uniform(0, 0.4, (n, 2)).astype(np.float32)
    boxes = np.concatenate([lo, lo + 0.5], 1)
    nb = np.random.default_rng(2).integers(0, n, (n, neighbours), dtype=np.int32) if neighbours else None
    r: dict[str, Any] = {"n": n, "heatmap": heatmap, "neighbours": neighbours, "input_size": size}
    t0 = time.perf_counter()
    st = SampleState.create(n, heatmap_size=heatmap, neighbours=neighbours)
    r["create_s"] = time.perf_counter() - t0
    try:
        r["segment_mb"] = os.path.getsize(st.path) / 2**20
        r["heatmaps_mb_double_buffered"] = 2 * heat.nbytes / 2**20
        r["publish_boxes_s"] = _timed(lambda: st.set_boxes(boxes))
        r["publish_heatmaps_s"] = _timed(lambda: st.set_heatmaps(heat, input_size=(size, size)))
        if nb is not None:
            r["publish_neighbours_s"] = _timed(lambda: st.set_neighbours(nb))
        child = subprocess.run([sys.executable, "-c", _READER, st.name], capture_output=True, text=True, timeout=3600)
        if child.returncode:
            raise ViewpipeError(f"state bench: the reader process failed: {child.stderr.strip().splitlines()[-1:]}")
        r["reader"] = json.loads(child.stdout)
        live = LiveBoxes(st)
        r["derive_all_here_s"] = _timed(lambda: live.boxes(np.arange(n)))
        r["set_threshold_of_s"] = _timed(lambda: SampleState.set_threshold_of(st.name, 0.3))
        r["rederive_batch256_s"] = _timed(lambda: live.boxes(np.arange(256)))
        r["owner_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r["torch_threads"] = _torch_threads()
        r["cpus"] = len(os.sched_getaffinity(0))
    finally:
        st.close()
    return r


def plan_cost(k: int, size: int, n: int = 65536, batch: int = 256, views: int = 2, batches: int = 40) -> dict:
    """ms per `Planner.plan` of a batch (`views` views of `size`, images of size/2..2·size px, smooth k×k
    heatmaps): boxes from the table (no heatmaps), from the box pass's table (heatmaps published with the boxes
    derived at the live threshold), and after a threshold change: first visits (derived) and later ones."""
    from viewpipe.augment import preset
    from viewpipe.heatmap_boxes import derive_boxes
    from viewpipe.pipelines import LoaderConfig
    from viewpipe.pipelines.plan import Planner, Substitutes
    from viewpipe.state import SampleState

    cfg = LoaderConfig(views=views, batch_size=batch, augment=preset("mocov2", size=size))
    rng = np.random.default_rng(0)
    sizes, order, heat = rng.integers(size // 2, 2 * size, (n, 2)), rng.permutation(n), _blobs(n, k)
    out = {}
    with SampleState.create(n, heatmap_size=k) as st:
        planner = Planner(cfg, 0, st, Substitutes(n, str), lambda i: sizes[i])

        def run(first: int) -> float:
            t0 = time.perf_counter()
            for b in range(first, first + batches):
                planner.plan(0, b, order[b * batch : (b + 1) * batch])
            return (time.perf_counter() - t0) / batches * 1e3

        run(0)
        out["boxes_table_ms"] = run(0)
        st.set_heatmaps(heat, input_size=(size, size))
        st.set_derived_boxes(derive_boxes(heat, (size, size), st.threshold), st.threshold)
        out["pass_table_ms"] = run(0)
        st.set_threshold(0.3)
        out["after_threshold_change_first_visit_ms"] = run(batches)
        out["after_threshold_change_cached_ms"] = run(batches)
    return out


def state_command(args: Any) -> int:
    """The `viewpipe state` actions beyond list and clean."""
    if args.action == "set-threshold":
        if len(args.args) != 2:
            raise ViewpipeError("usage: viewpipe state set-threshold NAME THRESHOLD (NAME as `viewpipe state list` "
                                "shows it)")
        print(set_threshold(*args.args))
    elif args.action == "show":
        if len(args.args) != 1:
            raise ViewpipeError("usage: viewpipe state show NAME (as `viewpipe state list` shows it)")
        print(show(args.args[0]))
    else:
        r = bench(args.n, args.heatmap, args.neighbours, args.size)
        r["plan_batch256_2views"] = {f"K={k} at {s}": plan_cost(k, s) for k, s in ((args.heatmap, args.size), (4, 32))}
        print(json.dumps(r, indent=1))
    return 0
