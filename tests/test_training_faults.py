"""Training against faults (issue 16), on the CPU with the tiny backbone: damaged, foreign and half-written
checkpoints are refused or replaced by the previous good one with one line; a non-finite loss stops the run
naming its step and never overwrites the last good checkpoint (or, with optim.skip_nonfinite, its update is
skipped and counted); every bad config value is refused before any work, one line naming its key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.checkpoint import (CheckpointError, load_checkpoint, previous_path, read_checkpoint,
                                          save_checkpoint, verify)
from viewpipe.trainers.config import TrainConfig, load_config, validate
from viewpipe.trainers.engine import NonFiniteError, Trainer, pretrain

from conftest import fit, tiny_run_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIEWPIPE = [sys.executable, "-m", "viewpipe.tools"]


def args(data: Path, out: Path, *extra: str) -> list[str]:
    """96 images in batches of 16: 6 steps an epoch."""
    return tiny_run_args(data, out, *extra, backend="dali", workers=1)


def tiny(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(None, args(data, out, *extra))


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: "), res.stderr[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def corrupt(path: Path, seed: int = 0) -> None:
    """4 KiB of random bytes over the middle of the file, its size unchanged."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - 2048
    data[mid : mid + 4096] = np.random.default_rng(seed).bytes(4096)
    path.write_bytes(bytes(data))


def inject(trainer: Trainer, bad: dict[int, float], after=None) -> list[int]:  # noqa: ANN001
    """Multiply the loss of forward call c (1-based: the step numbers of a fresh run) by bad[c] (NaN, inf);
    `after(call)` runs after each forward. Returns the list of calls made."""
    forward, calls = trainer.method.forward, []

    def patched(views, batch):  # noqa: ANN001, ANN202
        calls.append(len(calls) + 1)
        loss, logs = forward(views, batch)
        if calls[-1] in bad:
            loss = loss.abs() * bad[calls[-1]]
        if after is not None:
            after(calls[-1])
        return loss, logs

    trainer.method.forward = patched
    return calls


@pytest.fixture(scope="module")
def run2(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run: last.pt (step 12) and last.prev.pt (step 6)."""
    out = tmp_path_factory.mktemp("run2")
    pretrain(tiny(image_folder, out))
    return out


@pytest.fixture
def run(run2: Path, tmp_path: Path) -> Path:
    """A copy of the 2-epoch run for one test to damage."""
    return Path(shutil.copytree(run2, tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_carry_a_checksum_and_the_previous_one_is_kept(run: Path) -> None:
    last, prev = run / "last.pt", previous_path(run / "last.pt")
    assert prev.name == "last.prev.pt"
    assert verify(last) == ("ok", "") and verify(prev) == ("ok", "")
    assert read_checkpoint(last)[0]["step"] == 12 and read_checkpoint(prev)[0]["step"] == 6
    assert torch.load(last, map_location="cpu", weights_only=False)["step"] == 12  # still a torch.save file
    assert not list(run.glob(".*.tmp"))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(image_folder: Path, run: Path,
                                                             capfd: pytest.CaptureFixture) -> None:
    """4 KiB of random bytes in the middle of last.pt (same size): torch.load alone reads it (and training
    went on from NaN weights); the checksum refuses it and the resume takes last.prev.pt, with one warning line
    naming both. The next save moves the damaged file aside and keeps the one resumed from as the previous."""
    corrupt(run / "last.pt")
    assert verify(run / "last.pt")[0] == "bad"
    trainer = Trainer(tiny(image_folder, run, "epochs=3"), resume="auto")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("viewpipe: warning: "), err
    assert str(run / "last.pt") in err[0] and str(run / "last.prev.pt") in err[0] and "step 6" in err[0]
    assert trainer.step == 6 and trainer.epoch == 1
    result = fit(trainer)
    assert result["step"] == 18 and all(np.isfinite(r["loss"]) for r in result["history"])
    assert read_checkpoint(run / "last.pt")[0]["step"] == 18
    assert read_checkpoint(run / "last.prev.pt")[0]["step"] == 12  # (written by this resumed run)
    assert verify(run / "last.damaged.pt")[0] == "bad"


def test_no_good_checkpoint_is_one_line_and_exit_2(image_folder: Path, run: Path, tmp_path: Path) -> None:
    """Both checkpoints damaged: one line naming both, exit 2, nothing trained. A single damaged checkpoint
    given with --resume (no previous beside it): one line. A text file given as a checkpoint: one line."""
    corrupt(run / "last.pt", 1)
    corrupt(run / "last.prev.pt", 2)
    log = (run / "log.jsonl").read_text()
    res = subprocess.run([*VIEWPIPE, "pretrain", "--resume", "auto", *args(image_folder, run, "epochs=3")],
                         capture_output=True, text=True, timeout=120)
    one_line_error(res, str(run / "last.pt"), str(run / "last.prev.pt"), "no good checkpoint")
    assert (run / "log.jsonl").read_text() == log

    alone = tmp_path / "alone.pt"
    shutil.copy(run / "last.pt", alone)
    with pytest.raises(CheckpointError, match="alone.pt: damaged.*no previous checkpoint alone.prev.pt"):
        load_checkpoint(alone)

    text = tmp_path / "notes.txt"
    text.write_text("these are not the weights you are looking for\n" * 20)
    res = subprocess.run([*VIEWPIPE, "pretrain", "--resume", str(text), *args(image_folder, tmp_path / "t")],
                         capture_output=True, text=True, timeout=120)
    one_line_error(res, str(text), "not a checkpoint")
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")
    save_checkpoint({"weights": torch.ones(3)}, tmp_path / "other.pt")  # a good file, not a training checkpoint
    with pytest.raises(CheckpointError, match="not a viewpipe pretraining checkpoint"):
        load_checkpoint(tmp_path / "other.pt", ("model", "optimizer"))


def test_a_checkpoint_without_checksum_loads_with_a_warning(image_folder: Path, run: Path,
                                                           capfd: pytest.CaptureFixture) -> None:
    """A checkpoint of plain torch.save (before checksums) still resumes, with one warning line."""
    ckpt = torch.load(run / "last.prev.pt", map_location="cpu", weights_only=False)
    torch.save(ckpt, run / "old.pt")
    trainer = Trainer(tiny(image_folder, run / "resumed"), resume=str(run / "old.pt"))
    trainer.close()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no viewpipe checksum: loaded unverified" in err[0] and trainer.step == 6


KILLED_SAVE = """
import os, sys, torch
torch.set_num_threads(1)
from viewpipe.trainers.config import load_config
from viewpipe.trainers.engine import pretrain
calls, real = [0], os.replace
def replace(src, dst):
    if os.path.basename(dst).startswith("last."):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os._exit(137)  # killed here, as by SIGKILL: nothing is cleaned up
    real(src, dst)
os.replace = replace
pretrain(load_config(None, sys.argv[2:]))
"""


def test_killed_during_a_save(image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Killed in its second save after last.pt was moved to last.prev.pt and before the new one was renamed
    into place: the temporary file is removed at the next start, which resumes from last.prev.pt; a stale
    temporary file found at a save is removed too."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", KILLED_SAVE, "3", *args(image_folder, out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 137, res.stderr[-3000:]
    tmp = list(out.glob(".last.pt.*.tmp"))
    assert len(tmp) == 1 and not (out / "last.pt").exists() and (out / "last.prev.pt").is_file()
    capfd.readouterr()
    trainer = Trainer(tiny(image_folder, out, "epochs=3"), resume="auto")
    assert not tmp[0].exists() and trainer.step == 6
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt: no such file" in err[0] and "last.prev.pt (step 6)" in err[0], err
    stale = out / ".last.pt.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert fit(trainer)["step"] == 18
    assert not stale.exists() and not list(out.glob(".*.tmp"))
    assert read_checkpoint(out / "last.pt")[0]["step"] == 18


# ------------------------------------------------------------------------------------------------ NaN / inf
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_folder: Path,
                                                                        tmp_path: Path) -> None:
    """A NaN loss at step 7 (epoch 1, batch 1): the run stops at the next log point (step 8: the check reads
    a device-side record there, not every step) with one line naming step 7, and last.pt stays the good
    checkpoint of step 6, never overwritten by the NaN state (save_every=2 would have saved at step 8)."""
    trainer = Trainer(tiny(image_folder, tmp_path, "log_every=4", "save_every=2"))
    calls = inject(trainer, {7: float("nan")})
    with pytest.raises(NonFiniteError) as info:
        fit(trainer)
    msg = str(info.value)
    assert "\n" not in msg and "non-finite loss (nan) at step 7 (epoch 1, batch 1 of 6)" in msg, msg
    assert f"{tmp_path / 'last.pt'} (step 6), is kept" in msg and "optim.skip_nonfinite" in msg
    assert len(calls) == 8  # stopped at the first log point after the bad step
    ckpt = read_checkpoint(tmp_path / "last.pt")[0]
    assert ckpt["step"] == 6 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    events = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"event": "nonfinite_loss", "step": 7, "epoch": 1, "batch": 1, "loss": "nan"} in events


def test_nonfinite_loss_with_logging_every_step_and_no_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny(image_folder, tmp_path, "log_every=100"))
    calls = inject(trainer, {2: float("inf")})
    with pytest.raises(NonFiniteError, match=r"loss \(inf\) at step 2 \(epoch 0, batch 2 of 6\).*no checkpoint "
                                             r"of this run was written"):
        fit(trainer)
    assert len(calls) == 6 and not (tmp_path / "last.pt").exists()  # checked at the epoch's end at the latest


def test_nonfinite_weights_are_never_saved(image_folder: Path, tmp_path: Path) -> None:
    """A finite loss whose step leaves NaN weights (step 4): the save due after it is refused."""
    trainer = Trainer(tiny(image_folder, tmp_path, "save_every=2", "log_every=100"))

    def poison(call: int) -> None:
        if call == 4:
            next(trainer.method.parameters()).data.fill_(float("nan"))

    inject(trainer, {}, after=poison)
    with pytest.raises(NonFiniteError, match=r"non-finite weights after step 4 .*\(step 2\), is kept"):
        fit(trainer)
    assert read_checkpoint(tmp_path / "last.pt")[0]["step"] == 2


def test_skip_nonfinite_skips_counts_and_logs(image_folder: Path, tmp_path: Path,
                                             capfd: pytest.CaptureFixture) -> None:
    """optim.skip_nonfinite=true: the updates of steps 3 (NaN) and 8 (inf) are skipped (the weights before
    and after step 3 are equal), counted and logged; the run finishes with finite weights."""
    trainer = Trainer(tiny(image_folder, tmp_path, "optim.skip_nonfinite=true"))
    params: dict[int, list[torch.Tensor]] = {}

    def snapshot(call: int) -> None:  # after forward, before that step's update
        params[call] = [p.detach().clone() for p in trainer.method.parameters()]

    inject(trainer, {3: float("nan"), 8: float("inf")}, after=snapshot)
    result = fit(trainer)
    assert all(torch.equal(a, b) for a, b in zip(params[3], params[4]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(params[4], params[5]))  # step 4 did
    assert trainer.skipped_nonfinite == 2 and result["step"] == 12
    assert [r.get("skipped_nonfinite") for r in result["history"]] == [1, 1]
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    events = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["loss"]) for e in events if e.get("event") == "skipped_nonfinite"] == [(3, "nan"),
                                                                                                (8, "inf")]
    err = [x for x in capfd.readouterr().err.splitlines() if x.startswith("viewpipe: warning:")]
    assert len(err) == 2 and "step 3 (epoch 0, batch 3 of 6)" in err[0] and "step 8 (epoch 1, batch 2" in err[1]
    ckpt = read_checkpoint(tmp_path / "last.pt")[0]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_skip_nonfinite_stops_when_a_whole_epoch_is_skipped(image_folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny(image_folder, tmp_path, "optim.skip_nonfinite=true", "epochs=1"))
    inject(trainer, dict.fromkeys(range(1, 100), float("nan")))
    with pytest.raises(NonFiniteError, match="every step of epoch 0 \\(6\\) had a non-finite loss"):
        fit(trainer)


# ------------------------------------------------------------------------------------------------ configs
BAD = [
    ("optim.lr=-0.1", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.momentum=-0.9", "optim.momentum"), ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"), ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.final_lr_ratio=-1", "optim.final_lr_ratio"), ("optim.name=adam", "optim.name"),
    ("data.batch_size=0", "data.batch_size"), ("epochs=-1", "epochs"), ("epochs=0", "epochs"),
    ("data.size=0", "data.size"), ("data.size=-32", "data.size"), ("data.views=1", "data.views"),
    ("data.workers=-1", "data.workers"), ("data.backend=tensorflow", "data.backend"),
    ("data.hw_decoder_load=2", "data.hw_decoder_load"), ("knn_t=0", "knn_t"), ("knn_k=0", "knn_k"),
    ("log_every=0", "log_every"), ("save_every=-1", "save_every"), ("max_steps=-5", "max_steps"),
    ("ccrop.alpha=0", "ccrop.alpha"), ("ccrop.threshold=1.5", "ccrop.threshold"),
    ("ccrop.interval=0", "ccrop.interval"),
    ("method_args={tau: 0}", "method_args.tau"), ("method_args={queue: -1}", "method_args.queue"),
    ("method_args={momentum: 1.5}", "method_args.momentum"), ("device=tpu", "device"), ("seed=-1", "seed"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_bad_config_values_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ViewpipeError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(f"config.{key}: ") and "\n" not in str(info.value), str(info.value)


def test_views_per_method_and_the_validation_of_built_configs(image_folder: Path, tmp_path: Path) -> None:
    for method in ("mocov2", "simsiam", "snclr"):
        with pytest.raises(ViewpipeError, match=f"data.views: {method} needs at least 2 views of each sample, got 1"):
            load_config(None, [f"method={method}", "data.views=1"])
    with pytest.raises(ViewpipeError, match="data.views: csml needs exactly 2 views"):
        load_config(None, ["method=csml", "data.views=3"])
    assert load_config(None, ["data.views=3"]).data.views == 3
    cfg = tiny(image_folder, tmp_path)
    cfg.optim.lr = float("nan")  # a config built in code is checked by the Trainer
    with pytest.raises(ViewpipeError, match="config.optim.lr: expected a number >= 0, got nan"):
        Trainer(cfg)
    with pytest.raises(ViewpipeError, match="c.yaml.data.size: expected an integer >= 1, got 0"):
        (tmp_path / "c.yaml").write_text("data: {size: 0}\n")
        load_config(tmp_path / "c.yaml")
    assert validate(load_config(None)) == load_config(None)
    with pytest.raises(ViewpipeError, match="data.batch_size 128 is larger than the 96 training images"):
        Trainer(tiny(image_folder, tmp_path, "data.batch_size=128"))


@pytest.mark.parametrize("override,key", [("optim.lr=.nan", "optim.lr"), ("data.views=1", "data.views"),
                                          ("data.batch_size=128", "data.batch_size")])
def test_the_command_refuses_bad_configs_before_any_work(image_folder: Path, tmp_path: Path, override: str,
                                                         key: str) -> None:
    """One line, exit 2, no run folder made (the batch larger than the 96 images: found where the data is
    opened, before the model is built or anything trained)."""
    out = tmp_path / "out"
    res = subprocess.run([*VIEWPIPE, "pretrain", *args(image_folder, out, override)], capture_output=True,
                         text=True, timeout=120)
    one_line_error(res, key)
    assert not (out / "log.jsonl").exists() and not (out / "last.pt").exists()
