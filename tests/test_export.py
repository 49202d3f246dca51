"""`viewpipe export` (viewpipe.trainers.export, viewpipe.tools.export): stock torchvision and timm models load the
exported backbone with strict=True and compute the same pooled features as viewpipe's backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.checkpoint import save_checkpoint
from viewpipe.trainers.export import convert_state_dict, export
from viewpipe.trainers.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_like(name: str, seed: int = 0, **args: object) -> nn.Module:
    """A backbone whose BN statistics and affine parameters are not the fresh ones (as after training), so that a
    stem left at its initialisation, or BN buffers not carried over, change the features."""
    torch.manual_seed(seed)
    b = build_backbone(name, **args)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)
            elif isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)
    return b.eval()


def save_run(run: Path, name: str, backbone: nn.Module, **args: object) -> Path:
    """A run folder with a `last.pt` holding what the Trainer writes for the backbone (the keys export reads)."""
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"config": {"backbone": name, "backbone_args": dict(args)}, "backbone_name": name,
                     "backbone": backbone.state_dict(), "image_size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3,
                     "step": 1}, run / "last.pt")
    return run


def torchvision_pooled(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """The pooled features before fc of a torchvision ResNet."""
    model.eval()
    with torch.no_grad():
        return torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)


@pytest.mark.parametrize("name, make", [("resnet18", torchvision.models.resnet18),
                                        ("resnet50", torchvision.models.resnet50)])
def test_resnet_loads_strictly_into_torchvision_with_equal_features(tmp_path: Path, name: str, make) -> None:  # noqa: ANN001
    backbone = trained_like(name)
    run = save_run(tmp_path / "run", name, backbone)
    info = export(run, tmp_path / "out.pth", "torchvision")
    assert info.source == run / "last.pt" and info.num_classes == 1000 and info.family == "resnet"
    sd = torch.load(tmp_path / "out.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("stem.") for k in sd)
    model = make()
    assert not model.load_state_dict(sd, strict=True).missing_keys  # strict: every key, every shape
    assert torch.equal(model.conv1.weight, backbone.stem[0].weight)  # the stem is not left random
    assert torch.equal(model.bn1.running_var, backbone.stem[1].running_var)
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backbone.pooled(x)
    torch.testing.assert_close(torchvision_pooled(model, x), ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.eval()(x), torch.zeros(2, 1000))  # the zero classifier: logits 0 until trained
    # timm names a ResNet as torchvision does: the timm format writes the same
    export(run, tmp_path / "timm.pth", "timm")
    timm_sd = torch.load(tmp_path / "timm.pth", map_location="cpu", weights_only=True)
    assert timm_sd.keys() == sd.keys() and all(torch.equal(timm_sd[k], sd[k]) for k in sd)


def test_cifar_resnet18_loads_into_torchvision_with_its_stem_replaced(tmp_path: Path) -> None:
    backbone = trained_like("resnet18_cifar")
    sd = convert_state_dict(backbone, "resnet18_cifar", "torchvision", num_classes=10)
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        torchvision.models.resnet18(num_classes=10).load_state_dict(sd)  # the documented reason for the recipe
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()  # the recipe
    model.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(torchvision_pooled(model, x), backbone.pooled(x), rtol=1e-5, atol=1e-5)
    assert sd["fc.weight"].shape == (10, 512)


def test_vit_small_loads_strictly_into_timm_with_equal_features(tmp_path: Path) -> None:
    import timm

    backbone = trained_like("vit_small")
    run = save_run(tmp_path / "run", "vit_small", backbone)
    info = export(run, tmp_path / "vits.pth", "timm")
    assert info.heads == backbone.num_heads and info.family == "vit"
    assert f"num_heads={info.heads}" in info.how_to_load()
    sd = torch.load(tmp_path / "vits.pth", map_location="cpu", weights_only=True)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.weight", "blocks.0.norm1.bias",
                "blocks.3.attn.proj.weight", "blocks.5.mlp.fc1.weight", "blocks.5.mlp.fc2.bias", "norm.weight",
                "head.weight"):
        assert key in sd, key
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_heads=info.heads)
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = model.forward_head(model.forward_features(x), pre_logits=True)
        ours = backbone.pooled(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert ours.abs().mean() > 0.1  # not a trivial match
    # the torchvision layout loads into torchvision's VisionTransformer of the same shape, with equal features
    tv_sd = convert_state_dict(backbone, "vit_small", "torchvision")
    tv = torchvision.models.VisionTransformer(224, 16, 12, info.heads, 384, 1536)
    tv.load_state_dict(tv_sd, strict=True)
    tv.heads = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), ours, rtol=1e-4, atol=1e-4)


def test_small_vit_with_the_runs_heads(tmp_path: Path) -> None:
    """The heads are not in the weights: the run's backbone_args are read so that the export says the right ones."""
    from timm.models.vision_transformer import VisionTransformer

    backbone = trained_like("vit_tiny", heads=4)
    run = save_run(tmp_path / "run", "vit_tiny", backbone, heads=4)
    info = export(run / "last.pt", tmp_path / "t.pth", "timm")
    assert info.heads == 4
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=info.heads, num_classes=1000)
    model.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_head(model.forward_features(x), pre_logits=True),
                                   backbone.pooled(x), rtol=1e-4, atol=1e-4)


def test_no_head_and_errors(tmp_path: Path) -> None:
    backbone = trained_like("resnet18")
    run = save_run(tmp_path / "run", "resnet18", backbone)
    info = export(run, tmp_path / "nohead.pth", "torchvision", head=False)
    assert info.num_classes == 0
    res = torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "nohead.pth", weights_only=True),
                                                       strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    with pytest.raises(ViewpipeError, match="no such run folder or checkpoint"):
        export(tmp_path / "nowhere", tmp_path / "x.pth", "timm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ViewpipeError, match="no last.pt in this folder"):
        export(tmp_path / "empty", tmp_path / "x.pth", "timm")
    with pytest.raises(ViewpipeError, match="unknown format 'onnx'"):
        export(run, tmp_path / "x.pth", "onnx")
    with pytest.raises(ViewpipeError, match="is a folder"):
        export(run, tmp_path / "empty", "timm")
    plain = tmp_path / "plain.pt"
    torch.save({"something": 1}, plain)
    with pytest.raises(ViewpipeError, match=r"not a viewpipe pretraining checkpoint \(no backbone_name, backbone\)"):
        export(plain, tmp_path / "x.pth", "timm")
    assert not (tmp_path / "x.pth").exists()


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from viewpipe.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=180,
                          check=False)


def test_cli_export_and_one_line_errors(tmp_path: Path) -> None:
    run = save_run(tmp_path / "run", "resnet18", trained_like("resnet18"))
    res = run_cli("export", str(run), "--format", "torchvision", "--out", str(tmp_path / "r18.pth"), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["backbone"] == "resnet18" and out["format"] == "torchvision" and out["num_classes"] == 1000
    assert "torchvision.models.resnet18(num_classes=1000)" in out["load_into"]
    torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True))
    bad = run_cli("export", str(tmp_path / "missing"), "--format", "timm", "--out", str(tmp_path / "x.pth"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: ") and "missing" in lines[0], bad.stderr


def test_the_export_and_eval_commands_import_no_torch() -> None:
    code = "import sys, viewpipe.tools.evaluate, viewpipe.tools.export; assert 'torch' not in sys.modules, 'torch'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
