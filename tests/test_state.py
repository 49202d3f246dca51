"""SampleState: live updates across processes, no torn rows, cleanup on exit/signals, kill -9 reclaim."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time

import numpy as np
import pytest

from conftest import run_python, start_python
from viewpipe.errors import ViewpipeError
from viewpipe.state import SHM_DIR, PREFIX, SampleState, list_segments, reclaim_stale


def _path(name: str):
    return SHM_DIR / f"{PREFIX}{name}"


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
    above is strong enough to catch a broken protocol."""
    res = _hammer(state_name, tmp_path, "unprotected")
    assert res["mixed"] > 0, res


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
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    p = subprocess.Popen([sys.executable, "-u", str(script), state_name, "sleep"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert _path(state_name).exists()
    listed = run_python("from viewpipe.tools.cli import main; main(['state', 'list'])")
    assert f"{state_name}\t" in listed.stdout and "stale (owner gone)" in listed.stdout
    res = run_python("import sys; from viewpipe.tools.cli import main; sys.exit(main(['state', 'clean']))")
    assert res.returncode == 0, res.stderr
    assert f"removed {_path(state_name)}" in res.stdout
    assert not _path(state_name).exists()


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
