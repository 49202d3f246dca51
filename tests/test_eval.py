"""Clean whole-dataset passes (viewpipe.trainers.clean), the kNN monitor and the linear probe
(viewpipe.trainers.eval) and `viewpipe eval` (viewpipe.tools.evaluate). Small generated data, a tiny backbone."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from viewpipe.augment import IMAGENET_MEAN, IMAGENET_STD
from viewpipe.errors import ViewpipeError
from viewpipe.sources import FolderSource
from viewpipe.trainers.clean import CleanOptions, clean_loader, dataset_outputs
from viewpipe.trainers.eval import LinearConfig, knn_accuracy, knn_predict, knn_scores, linear_probe
from viewpipe.trainers.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """Three classes told apart by colour (noisy flat images of varied sizes): separable for any backbone."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(14, 30, size=2))
            img = np.clip(np.array(colour) + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("colours")
    return colour_folder(base / "train", 16, seed=0), colour_folder(base / "test", 8, seed=1)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet_tiny")


# --------------------------------------------------------------------------------------------------- kNN
def test_knn_predict_by_hand() -> None:
    # query (1, 0); bank sims: b0 1.0 (class 0), b1 0.0 (class 1), b2 1/√2 (class 1), b3 -1.0 (class 0)
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]) * torch.tensor([[3.0], [0.5], [2.0], [7.0]])
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[2.0, 0.0]])  # unnormalised on purpose: cosine similarity
    s2 = 1 / math.sqrt(2)
    # k 3, τ 0.5: neighbours b0, b2, b1 → class 0: e^(1/0.5); class 1: e^(s2/0.5) + e^0
    scores = knn_scores(q, bank, labels, 3, k=3, t=0.5)
    expected = torch.tensor([[math.exp(2.0), math.exp(2 * s2) + 1.0, 0.0]])
    torch.testing.assert_close(scores, expected)
    assert knn_predict(q, bank, labels, 3, k=3, t=0.5).tolist() == [0]  # the weights decide: 7.39 > 5.11
    # a high τ flattens the weights: two class-1 votes beat one class-0 vote
    assert knn_predict(q, bank, labels, 3, k=3, t=100.0).tolist() == [1]
    # k = 1: the nearest alone; k beyond the bank: all four (b3's weight e^(-1/0.5) added to class 0)
    assert knn_predict(q, bank, labels, 3, k=1, t=100.0).tolist() == [0]
    torch.testing.assert_close(knn_scores(q, bank, labels, 3, k=50, t=0.5),
                               expected + torch.tensor([[math.exp(-2.0), 0.0, 0.0]]))
    # a tie between classes (the query halfway between b0 and b1) goes to the lowest class index
    tie_bank, tie_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([2, 1])
    tie = knn_scores(torch.tensor([[1.0, 1.0]]), tie_bank, tie_labels, 3, k=2, t=0.1)
    assert tie[0, 1] == tie[0, 2] and tie[0, 0] == 0
    assert knn_predict(torch.tensor([[1.0, 1.0]]), tie_bank, tie_labels, 3, k=2, t=0.1).tolist() == [1]


def test_knn_chunks_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    b = bank / bank.norm(dim=1, keepdim=True)
    expected = torch.zeros(70, 7, dtype=torch.float64)
    for i, q in enumerate(queries / queries.norm(dim=1, keepdim=True)):
        sims = (b @ q).double()
        for j in sims.argsort(descending=True)[:20].tolist():
            expected[i, labels[j]] += math.exp(sims[j].item() / 0.1)
    for chunk in (1, 13, None):
        torch.testing.assert_close(knn_scores(queries, bank, labels, 7, k=20, t=0.1, chunk=chunk).double(), expected,
                                   rtol=1e-5, atol=0)
    assert torch.equal(knn_predict(queries, bank, labels, 7, k=20, chunk=13), expected.argmax(1))


def test_knn_planted_features_and_shuffled_labels() -> None:
    g = torch.Generator().manual_seed(1)
    C, D = 10, 32
    centres = torch.randn(C, D, generator=g) * 4
    bank_y, test_y = torch.arange(2000) % C, torch.arange(500) % C
    # labels shuffled against features without cluster structure (with clusters, a cluster's queries would
    # share their 200 neighbours and so their prediction: 10 coin flips, not 500): chance
    noise_bank, noise_test = torch.randn(2000, D, generator=g), torch.randn(500, D, generator=g)
    shuffled = bank_y[torch.randperm(2000, generator=g)]
    chance = (knn_predict(noise_test, noise_bank, shuffled, C) == test_y).float().mean().item()
    assert abs(chance - 1 / C) < 0.04, chance
    # the control: the same noise with the labels' signal added (to bank and queries) is learnt
    planted = knn_predict(noise_test + centres[test_y], noise_bank + centres[bank_y], bank_y, C)
    assert (planted == test_y).float().mean().item() == 1.0


# ------------------------------------------------------------------------------------------ clean passes
def pil_channel_means(folder: Path, size: int, resize: int = 0) -> np.ndarray:
    """(N, 3) means of the normalised clean images, computed directly with PIL / torchvision in dataset order."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    src = FolderSource(folder)
    rows = []
    for path in src.paths:
        img = Image.open(path).convert("RGB")
        if resize:
            img = TF.center_crop(TF.resize(img, resize, TF.InterpolationMode.BILINEAR, antialias=True), [size, size])
        else:
            img = img.resize((size, size), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float64) / 255
        rows.append(((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).mean(axis=(0, 1)))
    return np.stack(rows)


def channel_means(x: torch.Tensor) -> torch.Tensor:
    return x.double().mean(dim=(2, 3))


def test_dataset_outputs_rows_are_in_dataset_order(image_folder: Path) -> None:
    expected = pil_channel_means(image_folder, 24)
    out = dataset_outputs(channel_means, image_folder, CleanOptions(24, batch_size=7, workers=2, progress=False))
    assert out.shape == (len(expected), 3) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    # other shapes and dtypes of fn's output pass through (rows still per sample)
    ints = dataset_outputs(lambda x: (channel_means(x) * 1000).round().long().view(-1, 3, 1), image_folder,
                           CleanOptions(24, batch_size=50, workers=0, progress=False))
    assert ints.shape == (len(expected), 3, 1) and ints.dtype == torch.int64
    assert torch.equal(ints[:, :, 0], (out * 1000).round().long())


def test_clean_loader_share_resize_and_labels(image_folder: Path) -> None:
    src = FolderSource(image_folder)
    seen_idx, seen_lab = [], []
    for batch in clean_loader(src, CleanOptions(20, resize=28, batch_size=5, workers=0), rank=1, world=3):
        (images,) = batch.views
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 20, 20)
        seen_idx += batch.indices.tolist()
        seen_lab += batch.labels.tolist()
    assert seen_idx == list(range(1, len(src), 3))
    assert seen_lab == src.labels[1::3].tolist()
    # resize > 0: the shorter side to 28, then the centre 20×20 (torchvision's Resize + CenterCrop)
    out = dataset_outputs(channel_means, src, CleanOptions(20, resize=28, batch_size=32, workers=0, progress=False))
    np.testing.assert_allclose(out.numpy(), pil_channel_means(image_folder, 20, resize=28), atol=1e-5)


def test_a_sample_that_does_not_decode_is_reported_and_replaced(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A clean pass loses no row: an image that does not decode is named on one line and its row is the
    next usable sample's, as training replaces it."""
    folder = colour_folder(tmp_path / "data", 3, seed=0)
    (folder / "c1" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    src = FolderSource(folder)
    bad = [str(p) for p in src.paths].index(str(folder / "c1" / "bad.jpg"))
    for workers in (0, 2):
        out = dataset_outputs(channel_means, src, CleanOptions(16, batch_size=4, workers=workers, progress=False))
        lines = [ln for ln in capfd.readouterr().err.splitlines() if "bad.jpg" in ln]
        assert len(lines) == 1 and "fails to decode" in lines[0], lines
        assert len(out) == len(src) and torch.equal(out[bad], out[(bad + 1) % len(src)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = """
import os, sys
import numpy as np, torch, torch.distributed as dist
from viewpipe.trainers.clean import CleanOptions, dataset_outputs
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
means = dataset_outputs(lambda x: x.double().mean(dim=(2, 3)), sys.argv[3],
                        CleanOptions(24, batch_size=3, workers=0, progress=False))
flags = dataset_outputs(lambda x: x.mean(dim=(1, 2, 3)) > 0, sys.argv[3],
                        CleanOptions(24, batch_size=4, workers=1, progress=False))
np.savez(sys.argv[4], means=means.numpy(), flags=flags.numpy())
dist.destroy_process_group()
"""


def test_dataset_outputs_two_gloo_ranks(tmp_path: Path) -> None:
    folder = colour_folder(tmp_path / "data", 5, seed=2)  # 15 samples: rank 0 holds 8, rank 1 holds 7
    expected = pil_channel_means(folder, 24)
    assert len(expected) % 2 == 1
    port = str(_free_port())
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), port, str(folder), str(tmp_path / f"r{r}.npz")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r0, r1 = np.load(tmp_path / "r0.npz"), np.load(tmp_path / "r1.npz")
    assert r0["means"].shape == (15, 3) and r0["flags"].dtype == bool
    np.testing.assert_array_equal(r0["means"], r1["means"])
    np.testing.assert_array_equal(r0["flags"], r1["flags"])
    np.testing.assert_allclose(r0["means"], expected, atol=1e-5)
    np.testing.assert_array_equal(r0["flags"], expected.mean(axis=1) > 0)


# ---------------------------------------------------------------------------------- kNN through a backbone
def test_knn_accuracy_with_a_backbone(colours: tuple[Path, Path], tiny: torch.nn.Module) -> None:
    train, test = colours
    tiny.train()
    # train = test and k = 1: every image finds itself, so 100% holds only if features and labels line up
    assert knn_accuracy(tiny, train, train, CleanOptions(16, workers=0, progress=False), k=1,
                        allow_same_set=True) == 100.0
    assert tiny.training  # the mode is restored
    # colours are separable for any backbone: held-out images are classified by their neighbours
    assert knn_accuracy(tiny, train, test, CleanOptions(16, workers=0, progress=False), k=5) >= 90.0


# ------------------------------------------------------------------------------------------- linear probe
def test_linear_probe_learns_and_drops_lr_at_60_and_80_percent(colours: tuple[Path, Path],
                                                               tiny: torch.nn.Module) -> None:
    train, test = colours
    lines: list[str] = []
    cfg = LinearConfig(epochs=10, size=16, augment=False, workers=0, progress=False, lr=1.0)
    res = linear_probe(tiny, train, test, cfg, "cpu", log=lines.append)
    assert [h["lr"] for h in res.history] == pytest.approx([1.0] * 6 + [0.1] * 2 + [0.01] * 2)
    assert res.last_top1 >= 90.0 and res.best_top1 >= res.last_top1
    assert res.last_top1 == res.history[-1]["test_top1"]
    assert res.best_top1 == max(h["test_top1"] for h in res.history) == res.history[res.best_epoch - 1]["test_top1"]
    assert len(lines) == 10 and all(line.startswith("linear epoch ") for line in lines)
    assert LinearConfig().milestone_epochs() == [60, 80] and LinearConfig().lr == 10.0
    assert LinearConfig().batch_size == 512


def test_linear_probe_with_augmentation(colours: tuple[Path, Path], tiny: torch.nn.Module) -> None:
    train, test = colours
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    cfg = LinearConfig(epochs=6, size=16, batch_size=8, lr=1.0, workers=0, progress=False)
    torch.manual_seed(0)  # with workers=0 the crops draw from the global generator
    res = linear_probe(tiny, train, test, cfg, "cpu", log=None)
    assert res.augment and len(res.history) == 6
    assert res.history[0]["train_top1"] < 60.0 and res.last_top1 >= 90.0, res.history
    after = tiny.state_dict()  # frozen: the probe changes neither weights nor BN statistics
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ the CLI
def run_cli(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from viewpipe.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=180,
                          check=False)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viewpipe: error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_bad_checkpoints_are_one_line_errors(tmp_path: Path, image_folder: Path) -> None:
    from viewpipe.tools.evaluate import load_checkpoint

    data = ["--train", str(image_folder), "--test", str(image_folder)]
    missing = tmp_path / "nope.pt"
    assert_one_line_error(run_cli("eval", "knn", "--checkpoint", str(missing), *data), str(missing), "no such checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ViewpipeError, match="garbage.pt: cannot read the checkpoint") as err:
        load_checkpoint(garbage)
    assert len(str(err.value).splitlines()) == 1
    partial = tmp_path / "partial.pt"
    torch.save({"backbone_name": "resnet_tiny", "image_size": 32}, partial)
    with pytest.raises(ViewpipeError, match=r"partial.pt: not a viewpipe checkpoint \(missing backbone, mean, std\)"):
        load_checkpoint(partial)
    wrong = tmp_path / "wrong.pt"
    torch.save({"backbone_name": "resnet18_cifar", "backbone": build_backbone("resnet_tiny").state_dict(),
                "image_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}, wrong)
    with pytest.raises(ViewpipeError, match="wrong.pt: the backbone weights do not fit 'resnet18_cifar'") as err:
        load_checkpoint(wrong)
    assert len(str(err.value).splitlines()) == 1


def test_cli_knn_and_linear_on_a_saved_checkpoint(tmp_path: Path, colours: tuple[Path, Path], tiny: torch.nn.Module,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from viewpipe.tools.cli import main as cli

    train, test = colours
    ckpt = tmp_path / "last.pt"
    torch.save({"backbone_name": "resnet_tiny", "backbone": tiny.state_dict(), "image_size": 16,
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "epoch": 3}, ckpt)
    common = ["--checkpoint", str(ckpt), "--workers", "0", "--device", "cpu", "--no-progress"]
    assert cli(["eval", "knn", *common, "--train", str(train), "--test", str(train), "--k", "1", "--json",
                "--allow-same-set"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1"] == 100.0 and out["size"] == 16 and out["k"] == 1 and out["backbone"] == "resnet_tiny"
    assert cli(["eval", "knn", *common, "--train", str(train), "--test", str(test)]) == 0
    direct = knn_accuracy(tiny, train, test, CleanOptions(16, workers=0, progress=False))
    assert f"kNN top-1 {direct:.2f}%" in capsys.readouterr().out
    assert cli(["eval", "linear", *common, "--train", str(train), "--test", str(test), "--epochs", "3", "--lr", "1",
                "--no-augment", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["epochs"] == 3 and not out["augment"] and len(out["history"]) == 3 and out["batch_size"] == 512
    assert out["last_top1"] == out["history"][-1]["test_top1"]
    assert captured.err.count("linear epoch ") == 3  # with --json the epoch lines go to stderr


# --------------------------------------------------------------------------- same set, read-only labels
def npz_collection(path: Path, folders: dict[str, Path]) -> Path:
    """A .npz JPEG collection (uncompressed: its arrays are memory-mapped read-only) with one split per folder."""
    arrays: dict[str, np.ndarray] = {}
    for split, folder in folders.items():
        src = FolderSource(folder)
        files = [src.read(i) for i in range(len(src))]
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(files), np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        arrays[f"{split}_labels"] = src.labels
    arrays["class_names"] = np.array(FolderSource(next(iter(folders.values()))).classes)
    np.savez(path, **arrays)
    return path


def test_knn_refuses_the_same_set_unless_asked(tmp_path: Path, colours: tuple[Path, Path],
                                               tiny: torch.nn.Module) -> None:
    train, test = colours
    opts = CleanOptions(16, workers=0, progress=False)
    (tmp_path / "link").symlink_to(train)
    # the same folder, spelt otherwise, through a link, or given as a Source: resolved paths are compared
    for bank, queries in ((train, train), (train, train.parent / "." / train.name), (train, tmp_path / "link"),
                          (FolderSource(train), str(train))):
        with pytest.raises(ViewpipeError, match="the train set .* and the test set are the same") as err:
            knn_accuracy(tiny, bank, queries, opts, k=1)
        assert len(str(err.value).splitlines()) == 1 and "--allow-same-set" in str(err.value)
    npz = npz_collection(tmp_path / "c.npz", {"train": train, "test": test})
    with pytest.raises(ViewpipeError, match="are the same"):
        knn_accuracy(tiny, npz, npz, opts, k=1, split_test="train")
    # another split of the same .npz is another set
    assert knn_accuracy(tiny, npz, npz, opts, k=5, split_test="test") >= 90.0
    assert knn_accuracy(tiny, npz, npz, opts, k=1, split_test="train", allow_same_set=True) == 100.0


NO_WARNING_SCRIPT = """
import sys, warnings
warnings.simplefilter("error")  # any warning fails, torch's "The given NumPy array is not writable" above all
import torch
from viewpipe.sources import NpzSource
from viewpipe.trainers.clean import CleanOptions
from viewpipe.trainers.eval import LinearConfig, knn_accuracy, linear_probe
from viewpipe.trainers.models import build_backbone
npz = sys.argv[1]
assert not NpzSource(npz, "train").labels.flags.writeable  # the condition that made torch warn
torch.manual_seed(0)
tiny = build_backbone("resnet_tiny")
print(knn_accuracy(tiny, npz, npz, CleanOptions(16, workers=0, progress=False), k=5))
cfg = LinearConfig(epochs=2, size=16, augment=False, workers=0, progress=False, lr=1.0)
linear_probe(tiny, npz, npz, cfg, "cpu", log=None)
cfg.augment, cfg.batch_size = True, 16
linear_probe(tiny, npz, npz, cfg, "cpu", log=None)
"""


def test_read_only_labels_raise_no_numpy_warning(tmp_path: Path, colours: tuple[Path, Path]) -> None:
    # in a fresh interpreter: torch gives that warning once per process, so an earlier test could hide it here
    train, test = colours
    npz = npz_collection(tmp_path / "c.npz", {"train": train, "test": test})
    res = subprocess.run([sys.executable, "-c", NO_WARNING_SCRIPT, str(npz)], capture_output=True, text=True,
                         timeout=300, check=False, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "not writable" not in res.stderr and float(res.stdout.strip().splitlines()[-1]) >= 90.0


def test_cli_knn_same_set_is_a_one_line_error(tmp_path: Path, colours: tuple[Path, Path],
                                              tiny: torch.nn.Module) -> None:
    train, _ = colours
    ckpt = tmp_path / "last.pt"
    torch.save({"backbone_name": "resnet_tiny", "backbone": tiny.state_dict(), "image_size": 16,
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD}, ckpt)
    res = run_cli("eval", "knn", "--checkpoint", str(ckpt), "--train", str(train), "--test", str(train),
                  "--workers", "0", "--device", "cpu", "--no-progress")
    assert_one_line_error(res, "are the same", str(train), "--allow-same-set")
