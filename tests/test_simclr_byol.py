"""SimCLR and BYOL on the CPU: NT-Xent and BYOL's loss against loop-by-loop formulas written out here, NT-Xent
over two gloo ranks equal to the global batch's (loss and gradients), BYOL's cosine momentum schedule and its
target that no gradient reaches, a run stopped mid-epoch and resumed equal to an uninterrupted one, and the
shipped configs loading through the CLI's loader (and `viewpipe quality`'s row overrides)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from viewpipe.augment import CIFAR10_MEAN, IMAGENET_MEAN, preset
from viewpipe.errors import ViewpipeError
from viewpipe.trainers.base import build_method
from viewpipe.trainers.byol import BYOL, cosine_momentum_at, regression_loss
from viewpipe.trainers.config import load_config
from viewpipe.trainers.engine import pretrain
from viewpipe.trainers.models import build_backbone
from viewpipe.trainers.simclr import SimCLR, nt_xent

from conftest import step_losses, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARGS = {"simclr": "method_args={dim: 16, hidden: 32, tau: 0.5}",
        "byol": "method_args={dim: 16, hidden: 32, pred_hidden: 32, momentum: 0.9}"}


# ------------------------------------------------------------------------------------------------ SimCLR
def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """NT-Xent written out: the 2N embeddings [z1; z2], for each anchor i −log(e^{sᵢⱼ/τ} / Σ_{k≠i} e^{sᵢₖ/τ}) with
    j the other view of i's image and s the dot product; the mean over the 2N anchors."""
    z = [*z1.double(), *z2.double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / (2 * n)


def test_nt_xent_is_the_formula() -> None:
    """NT-Xent over the 2N views equals the loop; base_τ multiplies it by τ / base_τ (the release's scale)."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
    for tau in (0.5, 0.1):
        assert float(nt_xent(z1, z2, tau)) == pytest.approx(nt_xent_by_hand(z1, z2, tau), rel=1e-5)
    scaled = float(nt_xent(z1, z2, 0.5, base_tau=0.07))
    assert scaled == pytest.approx(nt_xent_by_hand(z1, z2, 0.5) * 0.5 / 0.07, rel=1e-5)
    with pytest.raises(ViewpipeError, match="base_tau"):
        SimCLR(build_backbone("resnet_tiny"), base_tau=-1.0)


def test_simclr_forward_is_nt_xent_of_its_embeddings() -> None:
    """forward: both views through one encoder as one batch, the L2-normalised projections' NT-Xent; two views
    only; the 512-512-128-style head is Linear-ReLU-Linear, head_bn puts BN after both layers."""
    torch.manual_seed(0)
    method = SimCLR(build_backbone("resnet_tiny"), dim=16, hidden=32, tau=0.5).eval()
    x1, x2 = torch.randn(4, 3, 24, 24), torch.randn(4, 3, 24, 24)
    loss, _ = method([x1, x2], {})
    z1, z2 = method.embed(x1), method.embed(x2)
    assert torch.allclose(z1.norm(dim=1), torch.ones(4), atol=1e-5)
    assert float(loss.detach()) == pytest.approx(nt_xent_by_hand(z1.detach(), z2.detach(), 0.5), rel=1e-4)
    assert SimCLR.views == (2, 2) and BYOL.views == (2, 2)
    assert [type(m).__name__ for m in method.head] == ["Linear", "ReLU", "Linear"]
    bn = SimCLR(build_backbone("resnet_tiny"), head_bn=True)
    assert [type(m).__name__ for m in bn.head] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]


RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist, torch.nn.functional as F
torch.set_num_threads(1)
from viewpipe.trainers.simclr import nt_xent
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
g = torch.Generator().manual_seed(0)
z1, z2 = (F.normalize(torch.randn(8, 6, generator=g), dim=1) for _ in range(2))
a, b = (z[rank * 4:(rank + 1) * 4].clone().requires_grad_(True) for z in (z1, z2))
loss = nt_xent(a, b, 0.5)
loss.backward()
print(json.dumps({"loss": float(loss), "g1": a.grad.tolist(), "g2": b.grad.tolist()}))
dist.destroy_process_group()
"""


def test_nt_xent_over_two_ranks_is_the_global_batch() -> None:
    """Two gloo ranks of 4 images each: every rank's anchors see all 16 embeddings as candidates, so the ranks'
    mean loss is the 8-image batch's on one process, and each embedding's gradient (every rank's terms reach it
    through the gather's backward; DDP then averages over the ranks) is the global loss's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    g = torch.Generator().manual_seed(0)
    z1, z2 = (F.normalize(torch.randn(8, 6, generator=g), dim=1).requires_grad_(True) for _ in range(2))
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    assert (outs[0]["loss"] + outs[1]["loss"]) / 2 == pytest.approx(float(loss.detach()), rel=1e-5)
    for r, out in enumerate(outs):
        rows = slice(r * 4, (r + 1) * 4)
        torch.testing.assert_close(torch.tensor(out["g1"]) / 2, z1.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(out["g2"]) / 2, z2.grad[rows], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ BYOL
def byol_loss_by_hand(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> float:
    """‖p̄ − z̄‖² of the L2-normalised vectors, one sample at a time, p₁ against z₂ plus p₂ against z₁, each
    averaged over the batch."""
    def one(p: torch.Tensor, z: torch.Tensor) -> float:
        terms = []
        for pi, zi in zip(p.double(), z.double()):
            pn, zn = pi / math.sqrt(float(pi @ pi)), zi / math.sqrt(float(zi @ zi))
            terms.append(float(((pn - zn) ** 2).sum()))
        return sum(terms) / len(terms)

    return one(p1, z2) + one(p2, z1)


def test_byol_loss_is_the_formula() -> None:
    """The symmetric loss 2 − 2·cos(p₁, z₂) + 2 − 2·cos(p₂, z₁) equals ‖p̄ − z̄‖² written out, and forward
    computes it from the online predictor's and the target projector's outputs."""
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(5, 8, generator=g) for _ in range(4))
    got = float(regression_loss(p1, z2) + regression_loss(p2, z1))
    assert got == pytest.approx(byol_loss_by_hand(p1, p2, z1, z2), rel=1e-5)
    torch.manual_seed(0)
    method = BYOL(build_backbone("resnet_tiny"), dim=16, hidden=32, pred_hidden=32).eval()
    x1, x2 = torch.randn(4, 3, 24, 24), torch.randn(4, 3, 24, 24)
    loss, _ = method([x1, x2], {})
    online = [method.predictor(method.projector(method.backbone.pooled(x))) for x in (x1, x2)]
    target = [method.target_projector(method.target_backbone.pooled(x)) for x in (x1, x2)]
    expect = byol_loss_by_hand(*(t.detach() for t in (*online, *target)))
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-4)


def test_byol_momentum_follows_the_cosine_schedule() -> None:
    """τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2: τ_base at the start, 1 at the end; after each step
    ξ ← τ_k·ξ + (1 − τ_k)·θ with k/K the engine's progress; cosine_momentum=False keeps τ_base."""
    K = 10
    for k in range(K + 1):
        assert cosine_momentum_at(0.996, k / K) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / K) + 1) / 2)
    assert cosine_momentum_at(0.996, 0.0) == pytest.approx(0.996) and cosine_momentum_at(0.996, 1.0) == 1.0
    method = BYOL(build_backbone("resnet_tiny"), dim=16, hidden=32, pred_hidden=32)
    assert BYOL(build_backbone("resnet_tiny")).base_momentum == 0.996
    with torch.no_grad():
        for p in [*method.backbone.parameters(), *method.projector.parameters()]:
            p.add_(1.0)  # online ≠ target
    before = [p.clone() for p in method.target_backbone.parameters()]
    online = [p.clone() for p in method.backbone.parameters()]
    method.after_step(0.3)
    m = 1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2
    for t, b, o in zip(method.target_backbone.parameters(), before, online):
        torch.testing.assert_close(t, m * b + (1 - m) * o)
    const = BYOL(build_backbone("resnet_tiny"), momentum=0.99, cosine_momentum=False)
    assert const.momentum_at(0.0) == const.momentum_at(0.7) == 0.99
    with pytest.raises(ViewpipeError, match="momentum"):
        BYOL(build_backbone("resnet_tiny"), momentum=1.5)


def test_byol_target_receives_no_gradient() -> None:
    """After backward the target's parameters have no gradient (nor requires_grad) and are not in the optimizer's
    groups; every online parameter (backbone, projector, predictor) has one; the target's BN statistics are
    its own buffers, in the state dict."""
    torch.manual_seed(0)
    method = BYOL(build_backbone("resnet_tiny"), dim=16, hidden=32, pred_hidden=32).train()
    target = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    stats = method.target_backbone.stem[1].running_mean.clone()
    loss, _ = method([torch.randn(4, 3, 24, 24), torch.randn(4, 3, 24, 24)], {})
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in target)
    online = [*method.backbone.parameters(), *method.projector.parameters(), *method.predictor.parameters()]
    assert all(p.grad is not None for p in online)
    grouped = {id(p) for g in method.param_groups() for p in g["params"]}
    assert grouped == {id(p) for p in online} and not grouped & {id(p) for p in target}
    assert not torch.equal(method.target_backbone.stem[1].running_mean, stats)  # the target's BN ran in train mode
    assert "target_backbone.stem.1.running_mean" in method.state_dict()


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resumed_run_equals_an_uninterrupted_one(image_folder: Path, tmp_path: Path, method: str) -> None:
    """A run stopped in its second epoch (step 8 of 12) and resumed from last.pt logs the same losses at every
    later step as an uninterrupted one and ends with the same weights (BYOL: the target too, whose momentum
    is recomputed from the progress)."""
    def cfg(out: Path, *extra: str):  # noqa: ANN202
        return load_config(None, tiny_run_args(image_folder, out, f"method={method}", ARGS[method], *extra))

    full = pretrain(cfg(tmp_path / "full"))
    assert full["step"] == 12
    pretrain(cfg(tmp_path / "cut", "max_steps=8"))
    mid = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    assert mid["step"] == 8 and mid["loader"] == {"epoch": 1, "batch": 2}
    pretrain(cfg(tmp_path / "cut"), resume="auto")
    expect, got = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    for s in range(9, 13):
        assert got[s] == pytest.approx(expect[s], rel=1e-5, abs=1e-6), s
    a = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys() and (method != "byol" or any(k.startswith("target_backbone.") for k in b))
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ configs
NEW = ["simclr_ccrop_cifar10", "simclr_cifar10", "byol_ccrop_cifar10", "byol_cifar10", "simclr_ccrop_imagenet",
       "byol_ccrop_imagenet"]


@pytest.mark.parametrize("name", NEW)
def test_configs_load_and_build(name: str) -> None:
    """Each config loads and validates through the CLI's loader (CIFAR-10 ones with the data paths the user gives)
    and builds its method; the CIFAR-10 recipes are the release's (SGD lr 0.5 × batch 512, SyncBN, CIFAR-10's
    normalisation; ContrastiveCrop α 0.1 from epoch 100 in the ccrop ones), ImageNet's the papers' (LARS)."""
    data = ["data.path=data/train", "data.test_path=data/test"] if "cifar10" in name else []
    cfg = load_config(CONFIGS / f"{name}.yaml", data)
    method = build_method(cfg)
    assert cfg.method == name.split("_")[0]
    assert type(method).__name__ == {"simclr": "SimCLR", "byol": "BYOL"}[cfg.method]
    assert cfg.sync_bn and cfg.ccrop.enabled == ("ccrop" in name)
    aug = preset(cfg.data.preset, size=cfg.data.size)
    if "cifar10" in name:
        assert aug.mean == CIFAR10_MEAN and cfg.backbone == "resnet18_cifar" and cfg.epochs == 500
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size) == ("sgd", 0.5, 1e-4, 512)
        assert (cfg.ccrop.alpha, cfg.ccrop.warmup, cfg.ccrop.interval) == (0.1, 100, 100)
        expect = ({"dim": 128, "hidden": 512, "tau": 0.5, "base_tau": 0.07} if cfg.method == "simclr"
                  else {"dim": 128, "hidden": 512, "pred_hidden": 512, "momentum": 0.996})
        assert cfg.method_args == expect
    else:
        assert aug.mean == IMAGENET_MEAN and cfg.backbone == "resnet50" and cfg.optim.name == "lars"
        assert (cfg.ccrop.alpha, cfg.ccrop.warmup, cfg.ccrop.interval) == (0.6, 20, 20)


@pytest.mark.parametrize("row", ["simclr", "simclr_ccrop", "byol", "byol_ccrop"])
def test_quality_rows_build_from_the_cifar10_configs(row: str, tmp_path: Path) -> None:
    """`viewpipe quality`'s row_config turns configs/<row>_cifar10.yaml into the table's run (epochs, batch, data
    and the box schedule scaled)."""
    from viewpipe.tools.quality import QualityConfig, row_config

    q = QualityConfig(data="c.npz", out=str(tmp_path), epochs=10, batch_size=256, device="cpu")
    cfg = row_config(row, q, tmp_path / "train", tmp_path / "test", 1)
    assert cfg.method == row.split("_")[0] and cfg.epochs == 10 and cfg.optim.lr == pytest.approx(0.25)
    assert cfg.ccrop.enabled == row.endswith("_ccrop") and (cfg.ccrop.warmup, cfg.ccrop.interval) == (2, 2)
