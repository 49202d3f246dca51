"""Bad inputs at scale (issue 25): loader workers per rank on a node of several ranks; files that are not
regular files in an image folder (a FIFO, a socket, a device, a dangling link, a folder named like an image);
a damaged checkpoint given to `viewpipe eval`. Each is one clear line and loses nothing else, never a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from viewpipe.synthetic import make_folder

CLI = "import sys; from viewpipe.tools.cli import main; sys.exit(main(sys.argv[1:]))"


def _cli(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`viewpipe ARGV` in a fresh interpreter and its own session: a hang past `timeout` kills the whole group
    (the conversion's worker processes too) and fails the test instead of the suite."""
    p = subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"viewpipe {' '.join(argv)}: still running after {timeout} s (a hang)")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 1. workers per rank
@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A fake node: `cores` CPU cores in this process's affinity, `ranks` ranks (LOCAL_WORLD_SIZE) on it."""

    def set_node(cores: int, ranks: int | None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))

    return set_node


def test_workers_are_divided_among_the_ranks_of_a_node(node) -> None:  # noqa: ANN001
    from viewpipe.trainers.config import TrainConfig, effective_workers, workers_line

    node(16, 8)
    default = TrainConfig().data.workers  # the default: the machine's cores, then this rank's share of them
    assert effective_workers(default) == 2
    assert effective_workers(1) == 1 and effective_workers(0) == 0  # an explicit value is per rank ...
    assert effective_workers(6) == 2  # ... capped at the rank's share of the node's cores
    assert workers_line(default) == "data: 2 workers per rank (16 cores / 8 ranks on this node)"
    node(2, 3)  # more ranks than cores: still one worker each
    assert effective_workers(TrainConfig().data.workers) == 1
    node(16, None)  # one process (no torchrun): every core
    assert effective_workers(TrainConfig().data.workers) == 16
    assert workers_line(16) == "data: 16 workers (16 cores, 1 rank on this node)"
    node(16, 8)
    assert workers_line(0) == "data: no loader workers: batches are read in the main process (data.workers=0)"


def test_the_loader_threads_follow_the_share(node) -> None:  # noqa: ANN001
    """DALI's num_threads and FFCV's num_workers are `LoaderConfig.workers`, the share the trainer passes."""
    from viewpipe.trainers import engine

    node(16, 8)
    src = Path(engine.__file__).read_text()
    assert src.count("workers=effective_workers(d.workers)") == 2 and "workers=d.workers" not in src
    for backend, read in (("dali", "max(1, cfg.workers)"), ("ffcv", "cfg.workers or 1")):
        path = Path(engine.__file__).parents[1] / "pipelines" / f"{backend}.py"
        assert read in path.read_text(), backend
    assert "workers_line(" in src  # printed once, at the start


# --------------------------------------------------------------------------- 2. files that are not regular
@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, dict[str, str], int]:
    """A small image folder with, beside its good JPEGs, a FIFO, a socket, a link to a character device, a
    dangling link, all named like images, and a folder named like an image holding one good JPEG: (root, the
    expected skip reasons by file, the good images)."""
    root = make_folder(tmp_path / "images", n=12, size_range=(24, 40), seed=3)
    (root / "boxes.npy").unlink()
    cls = sorted(p for p in root.iterdir() if p.is_dir())[0]
    good = sorted(cls.iterdir())[0]
    os.mkfifo(cls / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(cls / "socket.jpg"))
    sock.close()
    (cls / "null.jpg").symlink_to("/dev/null")
    (cls / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (cls / "folder.jpg").mkdir()
    (cls / "folder.jpg" / "inside.jpg").write_bytes(good.read_bytes())
    skipped = {str(cls / "fifo.jpg"): "not a regular file (a FIFO)",
               str(cls / "socket.jpg"): "not a regular file (a socket)",
               str(cls / "null.jpg"): "not a regular file (a character device)",
               str(cls / "dangling.jpg"): "cannot read (No such file or directory)"}
    return root, skipped, 13


def test_convert_skips_files_that_are_not_regular(odd_folder, tmp_path: Path) -> None:  # noqa: ANN001
    """The probe opens no file that could block (a FIFO waits for a writer): each is skipped with its kind in
    the report, every good image is converted, the folder named x.jpg is read as a folder."""
    root, expected, good = odd_folder
    dst = tmp_path / "ds"
    res = _cli("convert", str(root), str(dst), "--format", "dali", "--workers", "2", timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads((dst / "convert_report.json").read_text())
    assert report["complete"] and report["samples_written"] == good and report["files_seen"] == good + len(expected)
    assert {s["file"]: s["reason"] for s in report["skipped"]} == expected
    assert report["skipped_by_reason"] == {"not a regular file": 3, "cannot read": 1}
    assert "4 skipped (" in res.stdout and "not a regular file: 3" in res.stdout


@pytest.mark.timeout(30)  # (a regression blocks in open: fail, not hang)
def test_folder_source_read_names_a_fifo_at_once(odd_folder) -> None:  # noqa: ANN001
    from viewpipe.errors import UnreadableFileError
    from viewpipe.sources import FolderSource

    root, expected, good = odd_folder
    src = FolderSource(root)  # the listing opens nothing
    assert len(src) == good + len(expected)
    fifo = src.paths.index(next(f for f in expected if f.endswith("fifo.jpg")))
    with pytest.raises(UnreadableFileError) as err:
        src.read(fifo)
    message = str(err.value)
    assert err.value.reason == "not a regular file (a FIFO)" and message.startswith(src.paths[fifo])
    assert "remove it" in message and len(message.splitlines()) == 1


def test_the_reference_loader_names_a_fifo_instead_of_hanging(odd_folder) -> None:  # noqa: ANN001
    root, expected, _ = odd_folder
    for f in expected:
        if not f.endswith("fifo.jpg"):
            os.remove(f)
    fifo = next(f for f in expected if f.endswith("fifo.jpg"))
    res = _cli("bench", "--data", str(root), "--backend", "torch", "--batch-size", "7", "--batches", "2",
               "--workers", "1", "--size", "16", timeout=90)
    _one_line_error(res, fifo, "not a regular file (a FIFO)", "remove it")


# --------------------------------------------------------------------------- 3. eval reads checkpoints checked
def _save_two(run: Path) -> None:
    """last.prev.pt (epoch 1) and last.pt (epoch 2) of a tiny backbone, as `viewpipe pretrain` writes them."""
    from viewpipe.augment import IMAGENET_MEAN, IMAGENET_STD
    from viewpipe.trainers.checkpoint import save_checkpoint
    from viewpipe.trainers.models import build_backbone

    run.mkdir()
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        ckpt = {"backbone_name": "resnet_tiny", "backbone": build_backbone("resnet_tiny").state_dict(),
                "image_size": 16, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "epoch": epoch, "step": 6 * epoch}
        save_checkpoint(ckpt, run / "last.pt")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = np.random.default_rng(0).bytes(64)
    path.write_bytes(bytes(data))


def test_eval_falls_back_to_the_previous_checkpoint(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from viewpipe.tools.evaluate import load_checkpoint

    run = tmp_path / "run"
    _save_two(run)
    prev = torch.load(run / "last.prev.pt", map_location="cpu", weights_only=False)
    _flip(run / "last.pt")
    model = load_checkpoint(run / "last.pt")
    err = capfd.readouterr().err.strip().splitlines()
    assert model.path == run / "last.prev.pt"
    assert all(torch.equal(v, prev["backbone"][k]) for k, v in model.backbone.state_dict().items())
    assert len(err) == 1 and err[0].startswith("viewpipe: warning: "), err
    assert str(run / "last.pt") in err[0] and "damaged" in err[0] and str(run / "last.prev.pt") in err[0]
    assert "step 6" in err[0] and "--resume" not in err[0]


def test_eval_of_a_damaged_checkpoint_alone_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_two(run)
    (run / "last.prev.pt").unlink()
    _flip(run / "last.pt")
    data = tmp_path / "data"
    make_folder(data, n=12, size_range=(24, 32), seed=4)
    res = _cli("eval", "knn", "--checkpoint", str(run / "last.pt"), "--train", str(data), "--test", str(data),
               "--allow-same-set", "--workers", "0", "--device", "cpu", "--no-progress", timeout=120)
    line = _one_line_error(res, str(run / "last.pt"), "damaged", "last.prev.pt")
    assert "--resume" not in line
