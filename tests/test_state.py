"""SampleState: live updates across processes, no torn rows, cleanup on exit/signals, kill -9 reclaim, owners
alive by their lock (across PID namespaces), unprovable owners kept unless forced."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_python, start_python
import viewpipe.segments
from viewpipe.errors import ViewpipeError
from viewpipe.segments import (
    H_LAYOUT, H_LOCKED, H_MAGIC, H_PID, H_START, HEADER_BYTES, LAYOUT, MAGIC, PREFIX, list_segments, owner_alive,
    process_start, reclaim_stale,
)
from viewpipe.state import SampleState


@pytest.fixture(autouse=True)
def private_shm_dir(monkeypatch):
    """Each test's segments in a folder of its own on /dev/shm's tmpfs (VIEWPIPE_SHM_DIR, inherited by the
    processes it starts, those in other PID namespaces included): a `SampleState.create` of another test run on
    this machine reclaims stale segments and would take the stale ones these tests make and check."""
    base = viewpipe.segments.SHM_DIR
    folder = Path(tempfile.mkdtemp(prefix="viewpipe-tests-", dir=base if base.is_dir() else None))
    monkeypatch.setattr(viewpipe.segments, "SHM_DIR", folder)
    monkeypatch.setenv("VIEWPIPE_SHM_DIR", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _path(name: str) -> Path:
    return viewpipe.segments.SHM_DIR / f"{PREFIX}{name}"


def _header(name: str) -> np.ndarray:
    return np.frombuffer(_path(name).read_bytes()[:HEADER_BYTES], dtype=np.int64)


def _pid_not_running_here() -> int:
    """A pid no process has in this namespace (above pid_max), as a pid from another namespace may be."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1000


def _legacy_segment(name: str, pid: int, start: int) -> None:
    """A complete segment as a viewpipe without owner locks wrote it: owner pid and start time only."""
    header = np.zeros(HEADER_BYTES // 8, np.int64)
    header[H_MAGIC], header[H_LAYOUT], header[H_PID], header[H_START] = MAGIC, LAYOUT, pid, start
    _path(name).write_bytes(header.tobytes())


def test_create_defaults_and_roundtrip(state_name: str) -> None:
    with SampleState.create(10, name=state_name, heatmap_size=7, neighbours=5) as st:
        assert _path(state_name).exists()
        np.testing.assert_array_equal(st.boxes(), np.tile([0, 0, 1, 1], (10, 1)))
        np.testing.assert_array_equal(st.neighbours(), np.repeat(np.arange(10)[:, None], 5, 1))
        assert st.heatmaps().shape == (10, 7, 7) and st.heatmaps().dtype == np.uint8
        boxes = np.tile(np.array([0.1, 0.2, 0.6, 0.7], np.float32), (10, 1))
        v0 = st.version
        assert st.set_boxes(boxes, epoch=3) == 0
        np.testing.assert_array_equal(st.boxes(), boxes)
        assert st.version > v0 and st.epoch == 3
        st.set_boxes(np.array([[0.0, 0.0, 0.5, 0.5]], np.float32), rows=np.array([4]))
        got = st.boxes()
        np.testing.assert_array_equal(got[4], [0, 0, 0.5, 0.5])
        np.testing.assert_array_equal(np.delete(got, 4, 0), np.delete(boxes, 4, 0))
        np.testing.assert_array_equal(st.boxes(np.array([4, 0])), got[[4, 0]])
    assert not _path(state_name).exists()


def test_attach_is_read_only_and_pickles_by_name(state_name: str) -> None:
    with SampleState.create(4, name=state_name) as st:
        st.set_boxes(np.tile(np.array([0.1, 0.1, 0.9, 0.9], np.float32), (4, 1)))
        reader = pickle.loads(pickle.dumps(st))
        assert reader.name == st.name and not reader.is_owner
        np.testing.assert_array_equal(reader.boxes(), st.boxes())
        with pytest.raises(ViewpipeError, match="read-only"):
            reader.set_boxes(np.zeros((4, 4), np.float32))
        reader.close()
        assert _path(state_name).exists(), "a reader closing must not remove the owner's segment"


def test_attach_missing_gives_clear_error() -> None:
    with pytest.raises(ViewpipeError, match="no sample state named 'does-not-exist'"):
        SampleState.attach("does-not-exist")


def test_invalid_rows_fall_back_to_full_image_and_are_counted(state_name: str) -> None:
    with SampleState.create(7, name=state_name, neighbours=2) as st:
        boxes = np.array(
            [
                [0.1, 0.1, 0.5, 0.5],  # valid
                [np.nan, 0.1, 0.5, 0.5],
                [0.1, np.inf, 0.5, 0.5],
                [0.5, 0.1, 0.5, 0.6],  # h1 == h0
                [0.6, 0.1, 0.5, 0.6],  # h1 < h0
                [0.1, 0.1, 1.2, 0.5],  # outside [0, 1]
                [-0.1, 0.1, 0.5, 0.5],
            ],
            np.float32,
        )
        assert st.set_boxes(boxes) == 6
        got = st.boxes()
        np.testing.assert_array_equal(got[0], boxes[0])
        np.testing.assert_array_equal(got[1:], np.tile([0, 0, 1, 1], (6, 1)))
        assert st.invalid_rows("boxes") == 6
        assert st.set_boxes(np.array([[0.0, 0.3, 0.2, 0.2]], np.float32), rows=np.array([0])) == 1
        assert st.invalid_rows("boxes") == 1 and st.invalid_rows("boxes", total=True) == 7
        np.testing.assert_array_equal(st.boxes()[0], [0, 0, 1, 1])

        nb = np.array([[1, 2], [0, 7], [-1, 0], [4, 5], [3, 6], [6, 4], [0, 1]], np.int32)
        assert st.set_neighbours(nb) == 2
        got = st.neighbours()
        np.testing.assert_array_equal(got[1], [1, 1])
        np.testing.assert_array_equal(got[2], [2, 2])
        np.testing.assert_array_equal(got[[0, 3, 4, 5, 6]], nb[[0, 3, 4, 5, 6]])


def test_shape_errors_are_clear(state_name: str) -> None:
    with SampleState.create(3, name=state_name) as st:
        with pytest.raises(ViewpipeError, match="expected shape"):
            st.set_boxes(np.zeros((2, 4), np.float32))
        with pytest.raises(ViewpipeError, match="no neighbours table"):
            st.neighbours()
        with pytest.raises(ViewpipeError, match=r"row indices must lie in \[0, 3\)"):
            st.set_boxes(np.zeros((1, 4), np.float32), rows=np.array([3]))


def test_save_and_load(tmp_path, state_name: str) -> None:
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 0.5, (20, 2))
    boxes = np.concatenate([lo, lo + 0.3], 1).astype(np.float32)
    heat = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    nb = rng.integers(0, 20, (20, 3), dtype=np.int32)
    with SampleState.create(20, name=state_name, heatmap_size=4, neighbours=3) as st:
        st.set_boxes(boxes, epoch=42)
        st.set_heatmaps(heat)
        st.set_neighbours(nb)
        st.save(tmp_path / "state.npz")
    assert not list(tmp_path.glob("*.tmp"))
    with SampleState.create(20, name=state_name + "-b", heatmap_size=4, neighbours=3) as st2:
        st2.load(tmp_path / "state.npz")
        np.testing.assert_array_equal(st2.boxes(), boxes)
        np.testing.assert_array_equal(st2.heatmaps(), heat)
        np.testing.assert_array_equal(st2.neighbours(), nb)
        assert st2.epoch == 42
        (tmp_path / "junk.npz").write_bytes(b"not a zip")
        with pytest.raises(ViewpipeError, match="cannot read sample state file"):
            st2.load(tmp_path / "junk.npz")


def test_reader_in_another_process_sees_update_without_restart(state_name: str) -> None:
    with SampleState.create(100, name=state_name) as st:
        reader = start_python(
            f"""
            import time
            from viewpipe.state import SampleState
            st = SampleState.attach({state_name!r})
            v0 = st.version
            print("ready", st.boxes([7]).tolist(), flush=True)
            deadline = time.time() + 20
            while st.version == v0 and time.time() < deadline:
                time.sleep(0.001)
            print("seen", st.boxes([7]).tolist(), st.epoch, flush=True)
            """
        )
        line = reader.stdout.readline()
        assert line.startswith("ready [[0.0, 0.0, 1.0, 1.0]]"), line + reader.stderr.read()
        st.set_boxes(np.tile(np.array([0.25, 0.5, 0.75, 1.0], np.float32), (100, 1)), epoch=5)
        out, err = reader.communicate(timeout=30)
        assert out.strip() == "seen [[0.25, 0.5, 0.75, 1.0]] 5", out + err


_HAMMER_READER = """
import json, os, sys, time
import numpy as np
from viewpipe.state import SampleState
st = SampleState.attach(sys.argv[1])
protected = sys.argv[2] == "protected"
stop = sys.argv[3]
n, reads, torn, mixed = len(st), 0, 0, 0
perm = np.random.default_rng(0).permutation(n)   # slow gathers: a long window for a writer to interfere
print("ready", flush=True)
while not os.path.exists(stop):  # until the writer is done
    if protected:
        b = st.boxes(perm)
    else:  # the same read without the protocol's final check (the control)
        b = st._buffers["boxes"][int(st._header[16]) & 1][perm]
    # every row the writer publishes has w0 == h0, h1 == h0 + 0.25, w1 == h1 ...
    torn += int(((b[:, 1] != b[:, 0]) | (b[:, 2] != b[:, 0] + np.float32(0.25)) | (b[:, 3] != b[:, 2])).sum())
    # ... and one read must come from one published table
    mixed += int((b[:, 0] != b[0, 0]).any())
    reads += 1
print(json.dumps({"reads": reads, "torn": torn, "mixed": mixed}), flush=True)
"""


def _hammer(state_name: str, tmp_path, mode: str, seconds: float = 2.0, publishes: int = 100) -> dict:
    """One reader process reading whole tables while this process publishes new ones as fast as it can,
    for at least `seconds` and `publishes` (at most 20 s, so a loaded machine still gets a full hammer)."""
    import subprocess
    import sys

    n = 400_000
    script = tmp_path / "reader.py"
    script.write_text(_HAMMER_READER)
    tables = [np.tile(np.array([v, v, v + 0.25, v + 0.25], np.float32), (n, 1)) for v in (0.125, 0.25, 0.5)]
    with SampleState.create(n, name=state_name) as st:
        st.set_boxes(tables[0])
        stop = tmp_path / "stop"
        reader = subprocess.Popen([sys.executable, "-u", str(script), state_name, mode, str(stop)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
        g, start = 0, time.time()
        while (time.time() - start < seconds or g < publishes) and time.time() - start < 20:
            g += 1
            st.set_boxes(tables[g % 3])
        stop.touch()
        out, err = reader.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert g >= publishes and res["reads"] > 10, (g, res, err)
    return res


def test_no_torn_rows_under_a_hammering_writer(state_name: str, tmp_path) -> None:
    res = _hammer(state_name, tmp_path, "protected")
    assert res["torn"] == 0 and res["mixed"] == 0, res


def test_hammer_catches_reads_without_the_protocol(state_name: str, tmp_path) -> None:
    """Control: without the final generation check the same hammer does see mixed tables, so the test
    above is strong enough to catch a broken protocol. A mixed read needs the reader and the writer running at
    the same time; on a loaded 2-core machine they may take turns for a whole hammer, so it gets three, longer
    each time."""
    tries = []
    for attempt in range(3):
        (where := tmp_path / f"try{attempt}").mkdir()  # (its own stop file)
        tries.append(_hammer(f"{state_name}-{attempt}", where, "unprotected", seconds=2.0 * (attempt + 1)))
        if tries[-1]["mixed"] > 0:
            break
    assert tries[-1]["mixed"] > 0, tries


_OWNER = """
import signal, sys, time
import numpy as np
from viewpipe.state import SampleState
# Python keeps SIGINT ignored when its parent ignored it (a test run started with `nohup ... &`): be the usual
# interactive process, so the test does not depend on how the suite was started
signal.signal(signal.SIGINT, signal.default_int_handler)
st = SampleState.create(16, name=sys.argv[1])
print("ready", flush=True)
if sys.argv[2] == "exit":
    sys.stdin.readline()
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT"])
def test_segment_removed_on_exit_and_signals(how: str, state_name: str, tmp_path) -> None:
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    p = subprocess.Popen([sys.executable, "-u", str(script), state_name, how], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    assert _path(state_name).exists()
    if how != "exit":
        p.send_signal(getattr(signal, how))
    p.communicate("\n", timeout=30)
    if how == "SIGTERM":
        assert p.returncode == -signal.SIGTERM, "the default SIGTERM behaviour (exit status) is kept"
    assert not _path(state_name).exists()


def test_kill9_segment_is_detected_and_reclaimed(state_name: str, tmp_path) -> None:
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    p = subprocess.Popen([sys.executable, "-u", str(script), state_name, "sleep"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    live = subprocess.Popen([sys.executable, "-u", str(script), state_name + "-live", "sleep"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "ready"
    try:
        p.kill()
        p.wait(timeout=30)
        segs = {s.name: s for s in list_segments()}
        assert segs[state_name].complete and not segs[state_name].alive
        assert segs[state_name + "-live"].alive
        # the next start reclaims the dead owner's segment and keeps the live one
        with SampleState.create(4, name=state_name + "-next"):
            assert not _path(state_name).exists()
            assert _path(state_name + "-live").exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    reclaim_stale()


def test_state_clean_command_reclaims_kill9_segment(state_name: str, tmp_path) -> None:
    """`viewpipe state list`, `clean` and `clean --force` (one interpreter: the command imports torch): a segment
    left by kill -9 is stale and removed; one of a viewpipe without owner locks whose pid does not run here is
    unknown, kept by `clean` with a hint and removed by `clean --force`."""
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    p = subprocess.Popen([sys.executable, "-u", str(script), state_name, "sleep"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert _path(state_name).exists()
    legacy = state_name + "-legacy"
    _legacy_segment(legacy, _pid_not_running_here(), 12345)
    try:
        res = run_python(
            f"""
            import os
            from viewpipe.tools.cli import main
            for argv in (["state", "list"], ["state", "clean"], ["state", "clean", "--force"]):
                print("$", *argv, flush=True)
                rc = main(argv)
                print("rc", rc, "legacy exists", os.path.exists({str(_path(legacy))!r}), flush=True)
            """
        )
        assert res.returncode == 0, res.stderr
        listed, cleaned, forced = res.stdout.split("$ ")[1:]
        assert f"{state_name}\t" in listed and "stale (owner gone)" in listed
        assert f"{legacy}\t" in listed and "unknown (owner not proven alive or gone)" in listed
        assert f"removed {_path(state_name)}" in cleaned and f"removed {_path(legacy)}" not in cleaned
        assert f"kept {_path(legacy)}: made by a viewpipe without owner locks" in cleaned
        assert "`viewpipe state clean --force` removes it" in cleaned
        assert cleaned.strip().endswith("rc 0 legacy exists True"), cleaned
        assert f"removed {_path(legacy)}" in forced and forced.strip().endswith("rc 0 legacy exists False"), forced
        assert not _path(state_name).exists()
    finally:
        _path(legacy).unlink(missing_ok=True)


def test_half_created_segment_is_reclaimed_after_grace(state_name: str) -> None:
    path = _path(state_name)
    path.write_bytes(b"\0" * 4096)  # a creator killed before writing its header
    assert {s.name: s.alive for s in list_segments()}[state_name] is True, "fresh: maybe being created now"
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert state_name in {s.name for s in reclaim_stale()}
    assert not path.exists()


def test_create_with_live_duplicate_name_is_refused(state_name: str) -> None:
    with SampleState.create(2, name=state_name):
        with pytest.raises(ViewpipeError, match="already exists and its owner is alive"):
            SampleState.create(2, name=state_name)


def test_segments_without_owner_lock_are_kept_unless_forced(state_name: str) -> None:
    """Segments of a viewpipe without owner locks: alive when their pid runs here with the recorded start time;
    otherwise unknown (the owner may run in another PID namespace): kept by the reclaim and by `create` with
    the same name, removed only when forced."""
    running, gone = state_name + "-running", state_name + "-gone"
    _legacy_segment(running, os.getpid(), process_start(os.getpid()))
    _legacy_segment(gone, _pid_not_running_here(), 12345)
    try:
        segs = {s.name: s for s in list_segments()}
        assert segs[running].alive and segs[running].status == "alive"
        assert segs[gone].status == "unknown" and "another PID namespace" in segs[gone].reason
        assert not {running, gone} & {s.name for s in reclaim_stale()}
        with pytest.raises(ViewpipeError, match=r"cannot be proven alive or gone .*`viewpipe state clean --force`"):
            SampleState.create(2, name=gone)
        assert _path(gone).exists() and _path(running).exists()
        assert {s.name for s in reclaim_stale(force=True)} & {running, gone} == {gone}, "never a live one"
        assert not _path(gone).exists() and _path(running).exists()
    finally:
        _path(running).unlink(missing_ok=True)
        _path(gone).unlink(missing_ok=True)


def test_owner_lock_decides_liveness_not_the_pid(state_name: str, tmp_path, capsys) -> None:
    """No namespace needed: a live owner's header is given a pid that runs nowhere here (the view from another
    PID namespace). Its lock keeps it alive for list, clean (forced too) and `create` with the same name; readers
    attaching and closing in this process do not take or break that lock; kill -9 frees it."""
    import argparse

    from viewpipe.tools.cli import state_main

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([sys.executable, "-u", str(script), state_name, "sleep"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready", owner.stderr.read()
        header = _header(state_name)
        assert header[H_LOCKED] == 1 and header[H_PID] == owner.pid
        fake = _pid_not_running_here()
        with open(_path(state_name), "r+b") as f:
            f.seek(8 * H_PID)
            f.write(np.int64(fake).tobytes())
        assert not owner_alive(fake, int(header[H_START])), "the pid check alone would call this owner dead"

        for _ in range(3):  # readers in this process: attach (also by unpickling), read, close
            reader = SampleState.attach(state_name)
            np.testing.assert_array_equal(pickle.loads(pickle.dumps(reader)).boxes([0]), [[0, 0, 1, 1]])
            reader.close()
        seg = {s.name: s for s in list_segments()}[state_name]
        assert seg.alive and seg.owner_pid == fake and "holds the segment's lock" in seg.reason, seg
        assert state_name not in {s.name for s in reclaim_stale(force=True)}
        for force in (False, True):
            assert state_main(argparse.Namespace(action="clean", force=force)) == 0
        assert f"removed {_path(state_name)}" not in capsys.readouterr().out
        with pytest.raises(ViewpipeError, match="already exists and its owner is alive"):
            SampleState.create(2, name=state_name)
        assert _path(state_name).exists()
        np.testing.assert_array_equal(SampleState.attach(state_name).boxes([3]), [[0, 0, 1, 1]])  # a new attach works

        owner.kill()  # kill -9: the kernel drops the lock with the process
        owner.wait(timeout=30)
        seg = {s.name: s for s in list_segments()}[state_name]
        assert seg.stale and not seg.alive, seg
        with SampleState.create(2, name=state_name) as again:  # the name is free again
            assert _header(state_name)[H_PID] == os.getpid() and again.is_owner
    finally:
        owner.kill()
        owner.wait(timeout=30)


_FORKING_OWNER = """
import os, sys, time
from viewpipe.state import SampleState
st = SampleState.create(16, name=sys.argv[1])
closer = os.fork()
if closer == 0:  # a forked worker that closes its copy of the owner's object, and a reader of its own
    st.boxes()
    reader = SampleState.attach(sys.argv[1])
    reader.close()
    st.close()
    os._exit(0)
os.waitpid(closer, 0)
started, tell = os.pipe()
keeper = os.fork()
if keeper == 0:  # a forked loader worker that keeps reading through the inherited mapping
    os.write(tell, b"1")  # running Python: fork's after-child handlers have run
    while True:
        st.boxes([0])
        time.sleep(0.01)
os.read(started, 1)
print("ready", keeper, flush=True)
time.sleep(60)
"""


def test_forked_workers_neither_break_nor_inherit_the_owner_lock(state_name: str, tmp_path) -> None:
    """A worker forked from the owner that closes its copy does not release the owner's lock; one that outlives
    the owner (still mapping the segment, with its inherited descriptors) does not keep it: kill -9 of the owner
    alone leaves a reclaimable segment."""
    script = tmp_path / "owner.py"
    script.write_text(_FORKING_OWNER)
    owner = subprocess.Popen([sys.executable, "-u", str(script), state_name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    keeper = -1
    try:
        line = owner.stdout.readline().split()
        assert line[:1] == ["ready"], owner.stderr.read()
        keeper = int(line[1])
        assert {s.name: s for s in list_segments()}[state_name].alive, "a forked child's close released the lock"
        owner.kill()
        owner.wait(timeout=30)
        assert Path(f"/proc/{keeper}").exists(), "the forked worker still runs"
        seg = {s.name: s for s in list_segments()}[state_name]
        assert seg.stale, f"the forked worker kept the dead owner's lock: {seg}"
        assert state_name in {s.name for s in reclaim_stale()}
    finally:
        owner.kill()
        owner.wait(timeout=30)
        if keeper > 0:
            try:
                os.kill(keeper, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _path(state_name).unlink(missing_ok=True)


_UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]

_OTHER_NAMESPACE = """
import argparse, json, os, sys
import numpy as np
from viewpipe.errors import ViewpipeError
from viewpipe.segments import SHM_DIR, PREFIX, owner_alive, list_segments
from viewpipe.state import SampleState
from viewpipe.tools.cli import state_main
name = sys.argv[1]
path = SHM_DIR / f"{PREFIX}{name}"
seg = {s.name: s for s in list_segments()}[name]
header = np.frombuffer(path.read_bytes()[:4096], dtype=np.int64)
out = {"my_pid": os.getpid(), "pid_check_alive": owner_alive(int(header[2]), int(header[3])),
       "status": seg.status, "reason": seg.reason}
rcs = [state_main(argparse.Namespace(action="clean", force=force)) for force in (False, True)]
out["kept_by_clean"] = path.exists()
try:
    SampleState.create(4, name=name).close()
    out["create"] = "created"
except ViewpipeError as exc:
    out["create"] = str(exc)
out["kept_by_create"] = path.exists()
other = SampleState.create(2, name=name + "-b")  # creating (and reclaiming) still works here
other.close()
print(json.dumps(out), flush=True)
"""


def _in_new_pid_namespace(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_UNSHARE, sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=60)


def test_two_pid_namespaces_keep_each_others_segments(state_name: str, tmp_path) -> None:
    """Two jobs in separate PID namespaces sharing /dev/shm (docker --ipc=host), each its namespace's pid 1:
    `viewpipe state clean` (forced too) and `SampleState.create` with the same name in one keep the other's live
    segment, whose pid means another process there; kill -9 of the owner leaves it reclaimable from the other."""
    unshare = shutil.which("unshare")
    assert unshare, "this test needs util-linux `unshare` (apt-get install util-linux) and root"
    probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, (
        f"`{' '.join(_UNSHARE)} true` failed here ({probe.stderr.strip()}): this test needs root "
        "(or user namespaces) to start a job in its own PID namespace"
    )
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([*_UNSHARE, sys.executable, "-u", str(script), state_name, "sleep"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready", owner.stderr.read()
        assert _header(state_name)[H_PID] == 1, "the owner is pid 1 of its own namespace"

        res = _in_new_pid_namespace(_OTHER_NAMESPACE, state_name)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["my_pid"] == 1 and not got["pid_check_alive"], f"pid 1 there is another process: {got}"
        assert got["status"] == "alive" and "another PID namespace" in got["reason"], got
        assert got["kept_by_clean"] and got["kept_by_create"], got
        assert "already exists and its owner is alive" in got["create"], got
        np.testing.assert_array_equal(SampleState.attach(state_name).boxes([0]), [[0, 0, 1, 1]])

        # kill -9 of the owner (its pid out here: the child of `unshare`)
        inner = int(Path(f"/proc/{owner.pid}/task/{owner.pid}/children").read_text().split()[0])
        os.kill(inner, signal.SIGKILL)
        owner.wait(timeout=30)
        res = _in_new_pid_namespace(
            """
            import argparse, sys
            from viewpipe.tools.cli import state_main
            sys.exit(state_main(argparse.Namespace(action="clean", force=False)))
            """
        )
        assert res.returncode == 0, res.stderr
        assert f"removed {_path(state_name)}" in res.stdout, res.stdout
        assert not _path(state_name).exists()
    finally:
        owner.kill()
        owner.wait(timeout=30)
        _path(state_name).unlink(missing_ok=True)
