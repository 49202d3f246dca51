"""The trainers on the CPU with a tiny backbone: configs, the lr schedule, losses, the ContrastiveCrop
schedule and update through the loader, exact resume after a real kill, two-process gloo DDP, the demo."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.config import TrainConfig, load_config
from viewpipe.trainers.engine import Trainer, pretrain
from viewpipe.trainers.mocov2 import infonce
from viewpipe.trainers.optim import lr_at

from conftest import step_losses


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(None, [f"data.path={data}", "data.backend=dali", "backbone=resnet_tiny", "epochs=2",
                              "data.batch_size=16", "data.workers=1", "data.size=24", "method_args={queue: 256}",
                              "ccrop.enabled=false", f"out={out}", "log_every=1", "optim.lr=0.05", "device=cpu",
                              "channels_last=false", "knn_every=0", *extra])


# ------------------------------------------------------------------------------------------------ config
def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: simsiam\noptim: {lr: 0.1}\ndata: {size: 64}\n")
    assert load_config(path, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads this as text
    cfg = load_config(path, ["optim.lr=0.3", "ccrop.alpha=0.6", "method_args={dim: 64}", "data.preset=byol"])
    assert (cfg.method, cfg.optim.lr, cfg.ccrop.alpha, cfg.data.size) == ("simsiam", 0.3, 0.6, 64)
    assert cfg.method_args == {"dim": 64} and cfg.data.preset == "byol" and cfg.optim.momentum == 0.9
    with pytest.raises(ViewpipeError, match=r"override optim.lrr=1: unknown key lrr in optim; known: "):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ViewpipeError, match=r"optim.lr: expected float, got 'fast'"):
        load_config(path, ["optim.lr=fast"])
    with pytest.raises(ViewpipeError, match="expected key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ViewpipeError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    for f in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(f, ["data.path=data/train", "data.test_path=data/test"])  # every shipped config loads


def test_lr_schedule_warmup_and_cosine() -> None:
    cfg = load_config(None, ["epochs=10", "optim.lr=1.0", "optim.warmup_epochs=2", "optim.final_lr_ratio=0.1",
                             "optim.per_epoch=false"])
    assert lr_at(cfg, 0, 0, 10) == 0.0 and lr_at(cfg, 1, 0, 10) == pytest.approx(0.5)
    assert lr_at(cfg, 2, 0, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 6, 0, 10) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_at(cfg, 9, 10, 10) == pytest.approx(0.1)
    per_epoch = load_config(None, ["epochs=4", "optim.lr=1.0", "optim.final_lr_ratio=0.0"])
    assert [round(lr_at(per_epoch, e, 5, 10), 6) for e in range(4)] == [
        round(0.5 * (1 + math.cos(math.pi * e / 4)), 6) for e in range(4)]


def test_infonce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # (dim, K): keys (0, 1) and (1, 0)
    tau = 0.5
    logits = torch.tensor([0.6, 0.0, 1.0]) / tau
    assert float(infonce(q, k, queue, tau)) == pytest.approx(float(-torch.log_softmax(logits, 0)[0]), abs=1e-6)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ["mocov2", "simsiam"])
def test_losses_finite_and_decreasing(image_folder: Path, tmp_path: Path, method: str) -> None:
    """Epoch-mean losses fall. MoCo's first epoch is easier than the next (its queue starts with random keys
    and fills with real ones during it), so its comparison starts at epoch 1."""
    args = {"mocov2": ["method_args={queue: 64, momentum: 0.99}"],
            "simsiam": ["method_args={dim: 64, pred_hidden: 16}"]}
    cfg = tiny(image_folder, tmp_path, f"method={method}", "epochs=6", "optim.lr=0.05", *args[method])
    result = pretrain(cfg)
    losses = [r["loss"] for r in result["history"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    first = 1 if method == "mocov2" else 0
    assert np.mean(losses[-2:]) < np.mean(losses[first : first + 2]) - 0.05, losses


def test_box_update_changes_the_loaders_crops(image_folder: Path, tmp_path: Path) -> None:
    """After the update (epoch 0 with warmup 0) the trainer's loader uses the new boxes: the same epoch's
    batches differ from those of a plain RandomResizedCrop loader, and the published boxes are the pass's."""
    cfg = tiny(image_folder, tmp_path, "ccrop.enabled=true", "ccrop.warmup=0", "ccrop.interval=1", "epochs=3",
               "ccrop.alpha=0.6", "ccrop.grid=8")
    trainer = Trainer(cfg)
    try:
        assert [trainer.boxes.due(e) for e in range(3)] == [True, True, False]
        assert [trainer.boxes.use_box(e) for e in range(3)] == [False, True, True]
        before = trainer.loader(0)
        before.set_epoch(1)
        plain = [v.clone() for v in next(iter(before))[0]]
        assert trainer.data.writer and trainer.data.main
        record = trainer.boxes.run(trainer.method, trainer.data, 0)
        assert Path(record["box_grid"]).is_file()
        boxes = trainer.state.boxes()
        assert not np.allclose(boxes, [0, 0, 1, 1])  # learned boxes, not the initial full ones
        np.testing.assert_allclose(boxes, trainer.boxes.compute(trainer.method, trainer.data, 0).boxes)
        after = trainer.loader(1)
        assert after is not before
        after.set_epoch(1)
        batch = next(iter(after))
        assert any(not torch.equal(a, b) for a, b in zip(plain, batch[0]))
    finally:
        trainer.close()


def test_checkpoint_has_what_eval_needs(image_folder: Path, tmp_path: Path) -> None:
    cfg = tiny(image_folder, tmp_path, "epochs=1")
    pretrain(cfg)
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["backbone_name"] == "resnet_tiny" and ckpt["image_size"] == 24 and len(ckpt["mean"]) == 3
    assert ckpt["epoch"] == 1 and ckpt["loader"] == {"epoch": 1, "batch": 0}
    assert "queue" in ckpt["model"] and ckpt["sample_state"]["boxes"].shape == (96, 4)


# ------------------------------------------------------------------------------------------------ resume
RUN = """
import sys, torch
torch.set_num_threads(1)
from viewpipe.trainers.config import load_config
from viewpipe.trainers.engine import pretrain
cfg = load_config(None, sys.argv[2:])
pretrain(cfg, resume=sys.argv[1] or None)
"""


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", "data.backend=dali", "backbone=resnet_tiny", "epochs=3", "data.batch_size=16",
            "data.workers=1", "data.size=24", "method_args={queue: 64}", "ccrop.enabled=true", "ccrop.warmup=0",
            "ccrop.interval=1", "ccrop.grid=0", f"out={out}", "log_every=1", "device=cpu", "channels_last=false",
            "knn_every=0", "save_every=2", *extra]


def test_killed_mid_epoch_and_resumed_matches_an_uninterrupted_run(image_folder: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL in its second epoch (after a box update), resumed from its last checkpoint,
    logs the same losses for every later step as a run that was never interrupted."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = subprocess.run([sys.executable, "-c", RUN, "", *_args(image_folder, full)], capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expect = step_losses(full)
    assert len(expect) == 18  # 3 epochs × 6 batches of 16

    proc = subprocess.Popen([sys.executable, "-c", RUN, "", *_args(image_folder, cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (cut / "log.jsonl").is_file() and max(step_losses(cut), default=0) >= 9:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(step_losses(cut))
    assert 9 <= done < 18, "the run ended before it could be killed mid-run"
    ckpt = torch.load(cut / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["loader"]["batch"] in range(0, 6) and ckpt["step"] >= 8 and ckpt["box_updates"] >= 1
    resumed = subprocess.run([sys.executable, "-c", RUN, "auto", *_args(image_folder, cut)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [json.loads(x) for x in (cut / "log.jsonl").read_text().splitlines()]
    after = {r["step"]: r["loss"] for r in lines[len(lines) - (18 - ckpt["step"]) - 2:] if "event" not in r}
    assert set(after) >= set(range(ckpt["step"] + 1, 19))
    for s in range(ckpt["step"] + 1, 19):
        assert after[s] == pytest.approx(expect[s], rel=1e-5, abs=1e-6), s
    final = torch.load(cut / "last.pt", map_location="cpu", weights_only=False)
    reference = torch.load(full / "last.pt", map_location="cpu", weights_only=False)
    np.testing.assert_allclose(final["sample_state"]["boxes"], reference["sample_state"]["boxes"], atol=1e-6)
    for k, v in reference["model"].items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.parametrize("method,args", [
    ("mocov2", "method_args={queue: 64}"),
    ("csml", "method_args={queue: 64, k: 3, interval: 1}"),
    ("snclr", "method_args={bank: 64, topk: 4, dim: 32, mlp_dim: 64}"),
    ("simclr", "method_args={dim: 16, hidden: 32}"),  # negatives gathered from both ranks, with gradients
])
def test_two_gloo_ranks_train_in_step(image_folder: Path, tmp_path: Path, method: str, args: str) -> None:
    """Two processes as torchrun starts them (gloo on the CPU): both finish, the weights stay identical. CsMl:
    the neighbour table mined by both ranks (each its share, gathered) is the one a single process mines."""
    code = textwrap.dedent("""
        import sys, torch, hashlib
        torch.set_num_threads(1)
        from viewpipe.trainers.config import load_config
        from viewpipe.trainers.engine import Trainer
        trainer = Trainer(load_config(None, sys.argv[1:]))
        try:
            result = trainer.fit()
            flat = torch.cat([p.detach().flatten() for p in trainer.method.parameters()])
            print("HASH", hashlib.sha1(flat.numpy().tobytes()).hexdigest(), result["step"], trainer.world)
            if trainer.cfg.method == "csml":
                import dataclasses, numpy as np
                from viewpipe.trainers.csml import mine_neighbours, cosine_knn
                from viewpipe.trainers.clean import dataset_outputs, eval_mode
                backbone = trainer.method.key.backbone
                shared = mine_neighbours(backbone, trainer.source, trainer.data.clean, 3)
                alone_options = dataclasses.replace(trainer.data.clean, batch_size=256, workers=0)
                with eval_mode(backbone):
                    feats = dataset_outputs(backbone.pooled, trainer.source, alone_options, rank=0, world=1)
                alone = cosine_knn(feats, 3).numpy()
                print("TABLE", float(np.mean(np.sort(shared, 1) == np.sort(alone, 1))),
                      bool((trainer.state.neighbours() != np.arange(96)[:, None]).all()))
        finally:
            trainer.close()
        # reached only when all of the above succeeded: skip the interpreter teardown, where gloo's or a
        # loader's native threads occasionally abort ("terminate called without an active exception")
        import os
        sys.stdout.flush()
        os._exit(0)
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _args(image_folder, tmp_path / "ddp", "epochs=2", "ccrop.warmup=0", "data.batch_size=16",
                 f"method={method}", args)
    procs = []
    for rank in (0, 1):
        env = os.environ | {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: " + "\n".join(
            line for line in err.splitlines() if not line.startswith("[rank"))[-3000:]
    hashes = [next(line for line in out.splitlines() if line.startswith("HASH")).split() for out, _ in outs]
    assert hashes[0] == hashes[1] and hashes[0][2:] == ["12", "2"]  # 2 epochs × 6 batches of 8 per rank
    if method == "csml":
        tables = [next(line for line in out.splitlines() if line.startswith("TABLE")).split() for out, _ in outs]
        assert tables[0] == tables[1] == ["TABLE", "1.0", "True"]


# ------------------------------------------------------------------------------------------------ the demo
def test_demo_completes_and_its_boxes_beat_the_full_image(tmp_path: Path) -> None:
    env = os.environ | {"VIEWPIPE_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "viewpipe.tools", "demo", "--images", "600", "--epochs", "4",
                          "--workers", "2", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{"):])
    # warmup 1, interval 1 (epochs // 3): after epochs 1, 2 and 3 of 4, counted from 1 as ContrastiveCrop's release
    assert out["box_updates"] == 3 and out["images"] == 600 and out["images_per_s"] > 0
    assert out["box_iou_learned"] > out["box_iou_full_image"] + 0.03, out
    assert out["knn_top1"] > 2 * 100 / 12, out  # twice chance on 12 classes
    assert Path(out["box_grid"]).is_file() and Path(out["checkpoint"]).is_file()
