"""The faithful recipe defaults (issue #15), each against the official release it follows: MoCo v3's / SNCLR's
ViT-S (vits.py: 12 heads, fixed 2-D sin-cos position embedding, frozen patch projection), MoCo v3's bias-free
predictor, SimSiam's zero_init_residual and SyncBN, the shipped configs' optimizer, normalisation and SyncBN,
ContrastiveCrop's box schedule and CsMl's weight switch on the releases' epochs, and ranks that start from
identical weights, queues and banks (two gloo processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from viewpipe.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, preset
from viewpipe.errors import ViewpipeError
from viewpipe.trainers.base import build_method
from viewpipe.trainers.ccrop import BoxUpdater
from viewpipe.trainers.config import CCropConfig, load_config
from viewpipe.trainers.csml import CsMl
from viewpipe.trainers.models import ViT, build_backbone
from viewpipe.trainers.snclr import SNCLR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def release_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's `build_2d_sincos_position_embedding` (vits.py), copied as released (meshgrid's default 'ij')."""
    grid_w = torch.arange(grid, dtype=torch.float32)
    grid_h = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
    return torch.cat([torch.zeros([1, 1, dim]), pos_emb], dim=1)


# ------------------------------------------------------------------------------------------------ ViT
def test_vit_small_is_the_release_vit_s() -> None:
    """vit_small by default: 12 blocks of width 384 with 12 heads, the fixed sin-cos embedding (not trained),
    the patch projection frozen at MoCo v3's uniform initialisation, the class token N(0, 1e-6²)."""
    torch.manual_seed(0)
    vit = build_backbone("vit_small")
    net = vit.net
    assert len(net.encoder.layers) == 12 and vit.dim == 384
    assert {b.self_attention.num_heads for b in net.encoder.layers} == {12}
    torch.testing.assert_close(net.encoder.pos_embedding, release_sincos(14, 384), rtol=0, atol=0)
    assert not net.encoder.pos_embedding.requires_grad
    assert not net.conv_proj.weight.requires_grad and not net.conv_proj.bias.requires_grad
    bound = (6.0 / (3 * 16 * 16 + 384)) ** 0.5
    w = net.conv_proj.weight.detach()
    assert 0.95 * bound < float(w.abs().max()) <= bound and float(net.conv_proj.bias.detach().abs().sum()) == 0
    assert float(net.class_token.detach().abs().max()) < 1e-5
    qkv = net.encoder.layers[0].self_attention.in_proj_weight.detach()  # Q, K, V each Xavier-uniform over (384, 384)
    assert float(qkv.abs().max()) <= (6.0 / 768) ** 0.5 and float(qkv.abs().max()) > 0.95 * (6.0 / 768) ** 0.5


def test_vit_options_change_what_they_say() -> None:
    """heads, a learned position embedding and a trainable patch projection are options; bad values are
    one-line errors."""
    vit = build_backbone("vit_tiny", heads=4, pos_embed="learned", stop_grad_conv1=False, init="torchvision")
    assert {b.self_attention.num_heads for b in vit.net.encoder.layers} == {4}
    assert vit.net.encoder.pos_embedding.requires_grad and vit.net.conv_proj.weight.requires_grad
    assert not torch.equal(vit.net.encoder.pos_embedding.detach(), release_sincos(4, 64))
    for args, match in (({"pos_embed": "rope"}, "pos_embed 'rope'"), ({"heads": 3}, "heads = 3 must divide"),
                        ({"init": "x"}, "init 'x'"), ({"zero_init_residual": True}, "unknown zero_init_residual")):
        with pytest.raises(ViewpipeError, match=match):
            build_backbone("vit_tiny", **args)


def test_frozen_patch_projection_and_position_embedding_do_not_train() -> None:
    """An SNCLR step on the ViT (AdamW, weight decay) leaves the patch projection and the sin-cos embedding as
    they were and changes the blocks; neither frozen tensor is in the optimizer's groups."""
    torch.manual_seed(0)
    method = SNCLR(build_backbone("vit_tiny"), dim=16, mlp_dim=32, bank=64, topk=4, tau=0.2)
    net = method.backbone.net
    frozen = [net.conv_proj.weight, net.conv_proj.bias, net.encoder.pos_embedding]
    before = [t.detach().clone() for t in frozen]
    block = net.encoder.layers[0].mlp[0].weight.detach().clone()
    params = [p for g in method.param_groups() for p in g["params"]]
    assert not any(p is t for p in params for t in frozen)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    loss, _ = method(views, {})
    loss.backward()
    opt.step()
    for t, b in zip(frozen, before):
        assert torch.equal(t.detach(), b)
    assert not torch.equal(net.encoder.layers[0].mlp[0].weight.detach(), block)


# ------------------------------------------------------------------------------------------------ ResNet
def test_zero_init_residual_through_backbone_args() -> None:
    """backbone_args reach the ResNet: zero_init_residual zeroes the last BN of every residual branch (both
    block kinds), so each block starts as the identity; the default keeps torchvision's ones."""
    cfg = load_config(None, ["method=simsiam", "backbone=resnet_tiny", "backbone_args={zero_init_residual: true}",
                             "method_args={dim: 32, pred_hidden: 8}"])
    backbone = build_method(cfg).backbone
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    assert blocks and all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in blocks)
    r50 = build_backbone("resnet50", zero_init_residual=True)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in r50.layer1)
    assert all(float(b.bn2.weight.detach().abs().sum()) > 0 for b in build_backbone("resnet_tiny").layer1)
    with pytest.raises(ViewpipeError, match="backbone_args for resnet_tiny: unknown heads"):
        build_method(load_config(None, ["backbone=resnet_tiny", "backbone_args={heads: 6}"]))


# ------------------------------------------------------------------------------------------------ SNCLR heads
def test_snclr_mlps_have_no_bias_as_mocov3() -> None:
    """MoCo v3's `_build_mlp` uses Linear(bias=False) everywhere, also in the ResNet predictor whose last layer
    has no BN; `pred_bias=True` restores a bias there."""
    method = SNCLR(build_backbone("resnet_tiny"), dim=16, mlp_dim=32, bank=64, topk=4)
    linears = [m for m in (*method.projector.modules(), *method.predictor.modules()) if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and all(m.bias is None for m in linears)
    assert not isinstance(method.predictor[-1], nn.BatchNorm1d)
    biased = SNCLR(build_backbone("resnet_tiny"), dim=16, mlp_dim=32, bank=64, topk=4, pred_bias=True)
    assert biased.predictor[-1].bias is not None


# ------------------------------------------------------------------------------------------------ shipped configs
def test_shipped_configs_follow_the_releases() -> None:
    """SimSiam: zero_init_residual and SyncBN; SNCLR: SyncBN, ViT-S as released with AdamW's default betas;
    CIFAR runs normalise with CIFAR-10's mean and std (ContrastiveCrop's CIFAR configs), ImageNet runs with
    ImageNet's."""
    data = ["data.path=data/train", "data.test_path=data/test"]  # the CIFAR-10 configs leave them to the user
    configs = {p.stem: load_config(p, data) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert len(configs) >= 13
    for name, cfg in configs.items():
        if cfg.method == "simsiam":
            assert cfg.backbone_args == {"zero_init_residual": True} and cfg.sync_bn, name
        if cfg.method == "snclr":
            assert cfg.sync_bn, name
        if cfg.method in ("mocov2", "csml"):
            assert not cfg.sync_bn, name  # MoCo v2 shuffles BN across ranks instead (DDP_moco_ccrop.py)
        aug = preset(cfg.data.preset, size=cfg.data.size)
        if "cifar10" in name:
            assert (aug.mean, aug.std) == (CIFAR10_MEAN, CIFAR10_STD), name
        else:
            assert (aug.mean, aug.std) == (IMAGENET_MEAN, IMAGENET_STD), name
    vit = configs["snclr_vit_small_imagenet"]
    assert vit.optim.name == "adamw" and vit.optim.betas == (0.9, 0.999) and vit.optim.weight_decay == 0.1
    assert vit.method_args["tau"] == 0.2 and vit.method_args["topk"] == 30
    backbone = build_backbone(vit.backbone, **vit.backbone_args)
    assert isinstance(backbone, ViT) and backbone.num_heads == 12 and backbone.pos_embed == "sincos"
    assert backbone.stop_grad_conv1
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2023, 0.1994, 0.2010)
    # RandomResizedCrop's min scale: 0.08 for the ViT (SNCLR's --crop-min default), 0.2 for MoCo v3's ResNet recipe
    assert tuple(vit.data.crop.scale) == (0.08, 1.0)
    assert tuple(configs["snclr_imagenet"].data.crop.scale) == (0.2, 1.0)


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("epochs,warmup,interval,after", [
    (500, 100, 100, [100, 200, 300, 400]),  # small datasets: configs/small/*/*_ccrop.py
    (100, 20, 20, [20, 40, 60, 80]),  # ImageNet: configs/IN1K/mocov2_ccrop.py
    (6, 0, 2, [2, 4]),
])
def test_box_updates_after_the_release_epochs(epochs: int, warmup: int, interval: int, after: list[int]) -> None:
    """The release counts epochs from 1 and updates after epoch n when n >= warmup, n % interval == 0 and n is
    not the last; engine epoch e (from 0) is its epoch e + 1. Boxes are used from the epoch after the first
    update on (`use_box = epoch >= warmup_epochs + 1`)."""
    boxes = BoxUpdater(CCropConfig(warmup=warmup, interval=interval), epochs)
    assert [e + 1 for e in range(epochs) if boxes.due(e)] == after
    assert [e + 1 for e in range(epochs) if boxes.use_box(e)] == list(range(after[0] + 1, epochs + 1))


def test_csml_switches_after_epoch_10_from_the_shipped_config() -> None:
    """The release (main_moco.py, epochs from 0): soft_lam = (1, 0) while not `epoch > 10`."""
    cfg = load_config(CONFIGS / "csml_cifar10.yaml", ["method_args.queue=64", "data.path=d", "data.test_path=t"])
    method = build_method(cfg)
    assert isinstance(method, CsMl)
    seen = []
    for epoch in range(13):
        method.set_epoch(epoch)
        seen.append(method.ab)
    assert seen == [(1.0, 0.0)] * 11 + [(0.5, 0.5)] * 2


# ------------------------------------------------------------------------------------------------ ranks
RANK_SCRIPT = """
import sys, hashlib, torch, torch.distributed as dist
torch.set_num_threads(1)
from viewpipe.trainers.base import METHODS, build_method
from viewpipe.trainers.config import load_config
from viewpipe.trainers.models import build_backbone
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
torch.manual_seed(rank)  # as the engine: each rank seeded differently
for method, args in (("mocov2", "{queue: 64}"), ("snclr", "{bank: 64, topk: 4, dim: 16, mlp_dim: 32}"),
                     ("csml", "{queue: 64, k: 3}")):
    cfg = load_config(None, ["method=" + method, "backbone=resnet_tiny", "method_args=" + args])
    built = build_method(cfg)
    plain = METHODS[method](build_backbone("resnet_tiny"), **cfg.method_args)  # without the broadcast
    for what, m in (("built", built), ("plain", plain)):
        for name, t in m.state_dict().items():
            if name.endswith(("queue", "bank")) or what == "built":
                print(what, method, name, hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest())
dist.destroy_process_group()
"""


def test_ranks_start_with_identical_weights_queues_and_banks(tmp_path: Path) -> None:
    """Two gloo processes seeded differently: after build_method every parameter and buffer (MoCo's queue,
    SNCLR's bank, CsMl's per-level queues, the momentum encoders, BN statistics) is rank 0's on both, while the
    same methods built without the broadcast have different queues and banks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.split("\n"))
    built = [{tuple(line.split()[1:3]): line.split()[3] for line in out if line.startswith("built")} for out in outs]
    plain = [{tuple(line.split()[1:3]): line.split()[3] for line in out if line.startswith("plain")} for out in outs]
    assert ("mocov2", "queue") in built[0] and ("snclr", "bank") in built[0] and ("csml", "queue") in built[0]
    assert len(built[0]) > 50 and built[0] == built[1]
    assert set(plain[0]) == {("mocov2", "queue"), ("snclr", "bank"), ("csml", "queue")}
    assert all(plain[0][k] != plain[1][k] for k in plain[0])
