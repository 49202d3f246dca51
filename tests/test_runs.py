"""Runs a researcher can use (issue 15), on the CPU with the tiny backbone: a used run folder is refused
without --resume; Ctrl-C says how to resume, and the resumed run's log.jsonl holds every step once; TensorBoard
event files beside the log (step scalars, the epoch curve with the kNN accuracy, the box grid); a console line
per log point when stdout is not a terminal; `torchrun --no-python viewpipe pretrain` with two gloo ranks."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.checkpoint import read_checkpoint, trim_log
from viewpipe.trainers.config import TrainConfig, load_config
from viewpipe.trainers.engine import Trainer, TrainingInterrupted, pretrain

from conftest import fit, tiny_run_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIEWPIPE = [sys.executable, "-m", "viewpipe.tools"]
BIN = Path(sys.executable).parent


def args(data: Path, out: Path, *extra: str) -> list[str]:
    """96 images in batches of 16: 6 steps an epoch (the torch backend, decoded in the main process)."""
    return tiny_run_args(data, out, *extra)


def tiny(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(None, args(data, out, *extra))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def logged_steps(out: Path) -> list[int]:
    """The steps of log.jsonl's step records (not the events), in file order."""
    return [r["step"] for r in records(out) if "event" not in r]


def event_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {folder}"
    return files


def events(folder: Path) -> list:
    """Every TensorBoard event (the Event protos) in the event files of `folder`, in file order, read by
    tensorboard's own loader (it checks the records' framing)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e for f in event_files(folder) for e in EventFileLoader(str(f)).Load()]


def accumulated(folder: Path) -> Any:
    """What TensorBoard shows of the run folder `folder`: its event files read by tensorboard's
    EventAccumulator (every event kept; a resumed run's purge_step applied, as TensorBoard applies it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Tag -> step -> value of every scalar TensorBoard shows of `folder` (each step once: `steps` says so)."""
    acc = accumulated(folder)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def steps(folder: Path, tag: str) -> list[int]:
    """The steps of scalar `tag` in TensorBoard's view of `folder`, repeats kept."""
    return [e.step for e in accumulated(folder).Scalars(tag)]


def interrupt_at(trainer: Trainer, call: int, times: int = 1) -> None:
    """Send this process `times` real SIGINTs (Ctrl-C) during forward call `call` (1-based: step `call` of a
    fresh run)."""
    forward, calls = trainer.method.forward, [0]

    def hooked(views, batch):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return forward(views, batch)

    trainer.method.forward = hooked


# ------------------------------------------------------------------------------------------------ run folders
def test_a_used_run_folder_is_refused_without_resume(image_folder: Path, tmp_path: Path) -> None:
    """A second run into a folder that holds a run's checkpoint or log is refused with one line that says
    what to do, before anything in the folder changes; a folder with other files only is not a run's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    pretrain(tiny(image_folder, out, "max_steps=2"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ViewpipeError) as info:
        Trainer(tiny(image_folder, out, "optim.lr=0.1"))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{out} already holds a run (last.pt, log.jsonl)"), msg
    assert "--resume auto" in msg and "another out=" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # config.yaml and log untouched

    # only a log (a run stopped before its first checkpoint) is a run too; an empty log is not
    (out / "last.pt").unlink()
    with pytest.raises(ViewpipeError, match=r"already holds a run \(log.jsonl\)"):
        Trainer(tiny(image_folder, out))
    (out / "log.jsonl").write_text("")
    Trainer(tiny(image_folder, out)).close()


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(image_folder: Path, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture) -> None:
    """One Ctrl-C during step 9 lets that step finish, saves a checkpoint there and stops (saying so); the
    resumed run logs the same losses at steps 10.. as an uninterrupted run and ends with the same weights; the
    Ctrl-C handler is Python's default again after the run. Ctrl-C in the last step lets the run end normally."""
    full = pretrain(tiny(image_folder, tmp_path / "full"))
    out = tmp_path / "run"
    trainer = Trainer(tiny(image_folder, out))
    interrupt_at(trainer, 9)
    with pytest.raises(TrainingInterrupted) as info:
        fit(trainer)
    assert str(info.value) == (f"interrupted after step 9 (epoch 1, batch 3 of 6); the last checkpoint is "
                               f"{out / 'last.pt'} (step 9): a resume starts there")
    assert "stopping after this step with a checkpoint (Ctrl-C again to stop now)" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ckpt = read_checkpoint(out / "last.pt")[0]
    assert ckpt["step"] == 9 and ckpt["loader"] == {"epoch": 1, "batch": 3} and logged_steps(out) == list(range(1, 10))

    assert pretrain(tiny(image_folder, out), resume="auto")["step"] == full["step"] == 12
    assert logged_steps(out) == list(range(1, 13))
    expect, got = ({r["step"]: r["loss"] for r in records(o) if "event" not in r} for o in (tmp_path / "full", out))
    assert [got[s] for s in range(10, 13)] == pytest.approx([expect[s] for s in range(10, 13)], rel=1e-5, abs=1e-6)
    a, b = (read_checkpoint(o / "last.pt")[0]["model"] for o in (out, tmp_path / "full"))
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-5)

    last = Trainer(tiny(image_folder, tmp_path / "last"))  # Ctrl-C in the last step: the run is done, not stopped
    interrupt_at(last, 12)
    assert fit(last)["step"] == 12 and read_checkpoint(tmp_path / "last" / "last.pt")[0]["step"] == 12


def test_interrupted_then_resumed_logs_every_step_once(image_folder: Path, tmp_path: Path) -> None:
    """Ctrl-C twice at step 9 (stop now; the last checkpoint: step 6, the end of epoch 0) stops the run with a
    message naming that checkpoint; the resumed run replaces the records of steps 7 and 8 rather than appending
    them again, and TensorBoard's events after the checkpoint are purged on resume (purge_step)."""
    out = tmp_path / "run"
    trainer = Trainer(tiny(image_folder, out))
    interrupt_at(trainer, 9, times=2)
    with pytest.raises(TrainingInterrupted) as info:
        fit(trainer)
    msg = str(info.value)
    assert msg == (f"interrupted after step 8 (epoch 1, batch 2 of 6); the last checkpoint is {out / 'last.pt'} "
                   f"(step 6): a resume starts there"), msg
    assert info.value.resume == "auto" and info.value.main
    assert logged_steps(out) == list(range(1, 9)) and read_checkpoint(out / "last.pt")[0]["step"] == 6

    result = pretrain(tiny(image_folder, out), resume="auto")
    assert result["step"] == 12
    assert logged_steps(out) == list(range(1, 13))  # each step once
    starts = [r for r in records(out) if r.get("event") == "start"]
    assert starts == [{"event": "start", "step": 0, "epoch": 0, "world": 1, "resumed_from": None},
                      {"event": "start", "step": 6, "epoch": 1, "world": 1, "resumed_from": str(out / "last.pt")}]
    assert [r["epoch"] for r in records(out) if r.get("event") == "epoch"] == [0, 1]
    purges = [e.step for e in events(out) if e.HasField("session_log") and e.session_log.status == 1]
    assert purges == [7]  # TensorBoard hides the first run's steps 7 and 8
    assert steps(out, "train/loss") == list(range(1, 13))  # as TensorBoard shows it: each step once


def test_trim_log_keeps_what_the_checkpoint_has_seen(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"event": "start", "step": 0}\n{"step": 1}\n{"step": 2}\n{"event": "epoch", "step": 2}\n'
                   '{"step": 3}\n{"step": 4, "lo')  # (a line cut by a kill)
    assert trim_log(log, 2) == 2
    assert log.read_text() == '{"event": "start", "step": 0}\n{"step": 1}\n{"step": 2}\n{"event": "epoch", "step": 2}\n'
    assert trim_log(log, 2) == 0 and trim_log(tmp_path / "none.jsonl", 0) == 0


def test_ctrl_c_on_the_command_names_the_resume_command(image_folder: Path, tmp_path: Path) -> None:
    """`viewpipe pretrain` with stdout a pipe prints a line per log point; SIGINT there finishes the step,
    saves a checkpoint at it and exits 130 with one line naming the command that resumes it; that command
    finishes the run with every step logged once; the same command without --resume is refused in one line.
    The SIGINT goes to the whole process group, as a terminal's Ctrl-C does: the loader's 2 worker processes get
    it too, and the message comes once."""
    out = tmp_path / "run"
    cmd = ["pretrain", *tiny_run_args(image_folder, out, "epochs=30", "log_every=2", workers=2)]
    proc = subprocess.Popen([*VIEWPIPE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("epoch 1 step 8 "):
                os.killpg(proc.pid, signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    step_lines = [ln for ln in lines if " (batch " in ln]
    assert [ln.split()[3] for ln in step_lines] == ["2", "4", "6", "8"]  # one every log_every=2 steps
    assert step_lines[0].startswith("epoch 0 step 2 (batch 2/6)  loss ") and "images/s" in step_lines[0]
    last = err.strip().splitlines()[-1]
    prefix = "viewpipe: interrupted after step "
    assert last.startswith(prefix), err[-3000:]
    assert err.count("stopping after this step with a checkpoint") == 1, err[-3000:]
    resume = shlex.split(last.split("; resume with: ", 1)[1])
    assert resume == ["viewpipe", *cmd, "--resume", "auto"]
    stopped = int(last[len(prefix):].split()[0])
    assert f"the last checkpoint is {out / 'last.pt'} (step {stopped})" in last, err[-3000:]
    assert stopped >= 8 and read_checkpoint(out / "last.pt")[0]["step"] == stopped
    assert logged_steps(out) == list(range(2, stopped + 1, 2))

    again = subprocess.run([*VIEWPIPE, *cmd], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"viewpipe: error: {out} already holds a run (last.pt, last.prev.pt, log.jsonl): pass --resume auto to "
        f"continue it, or choose another out=... for a new run"], again.stderr[-3000:]

    done = subprocess.run([*VIEWPIPE, *resume[1:-2], "max_steps=4", *resume[-2:]], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_steps(out) == list(range(2, stopped + 5, 2))  # each step logged once


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_events_and_console_lines(image_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Event files beside log.jsonl: every logged step's loss, lr and throughput; per epoch the mean loss and
    the kNN accuracy (x: epochs done) and the box grid PNG as an image. stdout is not a terminal here: one
    console line per log point instead of the progress bar."""
    from viewpipe.synthetic import make_folder

    out, test = tmp_path / "run", make_folder(tmp_path / "test", n=24, size_range=(40, 64), seed=2)
    cfg = tiny(image_folder, out, "log_every=2", "ccrop.enabled=true", "ccrop.warmup=0", "ccrop.interval=1",
               "ccrop.grid=8", f"data.test_path={test}", "data.test_split=train", "knn_every=1", "knn_k=5")
    result = pretrain(cfg)
    printed = capsys.readouterr().out.splitlines()
    assert [ln.split()[3] for ln in printed if " (batch " in ln] == ["2", "4", "6", "8", "10", "12"]

    tb = scalars(out)
    log = {r["step"]: r for r in records(out) if "event" not in r}
    assert sorted(tb["train/loss"]) == sorted(log) == [2, 4, 6, 8, 10, 12]
    for step, r in log.items():
        assert tb["train/loss"][step] == pytest.approx(r["loss"], rel=1e-6)
        assert tb["train/lr"][step] == pytest.approx(r["lr"], rel=1e-6)
        assert tb["train/images_per_s"][step] == pytest.approx(r["images_per_s"], rel=1e-6)
    knn = [r["knn_top1"] for r in result["history"]]
    assert tb["epoch/knn_top1"] == pytest.approx({1: knn[0], 2: knn[1]}, rel=1e-6)
    assert sorted(tb["epoch/loss"]) == [1, 2]
    acc = accumulated(out)
    assert acc.Tags()["images"] == ["ccrop/boxes"]
    images = acc.Images("ccrop/boxes")
    assert [e.step for e in images] == [1]  # the update after epoch 0 (none after the last)
    from PIL import Image

    shown = Image.open(io.BytesIO(images[0].encoded_image_string))
    png = Image.open(out / "boxes_epoch0000.png")
    assert shown.size == png.size == (images[0].width, images[0].height)
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(png.convert("RGB")))


# ------------------------------------------------------------------------------------------------ torchrun
def test_torchrun_launches_the_viewpipe_command(image_folder: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 --no-python viewpipe pretrain ...`: two gloo ranks on the CPU train in step;
    rank 0 alone writes the run folder (one log without repeated steps, one event file, config.yaml) and prints;
    the checkpoint holds both ranks' RNG states."""
    torchrun, viewpipe = BIN / "torchrun", BIN / "viewpipe"
    if not (torchrun.is_file() and viewpipe.is_file()):
        pytest.skip(f"torchrun or the viewpipe command is not installed in {BIN}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "--no-python",
                          "viewpipe", "pretrain", *args(image_folder, out, "log_every=1", "max_steps=4")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done: epoch 0, step 4") == 1, res.stdout  # rank 0 only
    assert logged_steps(out) == [1, 2, 3, 4]
    assert [r["world"] for r in records(out) if r.get("event") == "start"] == [2]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1 and sorted(scalars(out)["train/loss"]) == [1, 2, 3, 4]
    assert (out / "config.yaml").is_file()
    ckpt = read_checkpoint(out / "last.pt")[0]
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seeded seed + rank: two processes


TEARDOWN_SCRIPT = """
import sys, torch.distributed as dist
from viewpipe import dist as vdist
own = sys.argv[1] == "own"
if not own:
    dist.init_process_group("gloo")  # the caller's group: teardown leaves it
vdist.setup("cpu")
assert vdist.several()
vdist.teardown()
print("on after teardown:", vdist.is_on())
if not own:
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("who", ["own", "caller"])
def test_teardown_destroys_only_the_group_setup_made(who: str) -> None:
    """Under torchrun's variables `setup` creates the gloo group and `teardown` destroys it after a barrier (left
    to interpreter exit, gloo's threads can abort a rank); a group the caller made stays."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", TEARDOWN_SCRIPT, who], env=base | {"RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == f"on after teardown: {who == 'caller'}"


def test_resume_command_replaces_resume_and_keeps_the_torchrun_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from viewpipe.tools.cli import resume_command

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    argv = ["pretrain", "--config", "c.yaml", "--resume", "old/last.pt", "out=runs/a b", "--resume=x"]
    assert resume_command(argv, "auto") == "viewpipe pretrain --config c.yaml 'out=runs/a b' --resume auto"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert resume_command(["pretrain", "epochs=3"], "auto") == (
        "torchrun --nnodes 2 --nproc-per-node 4 --no-python viewpipe pretrain epochs=3 --resume auto")
