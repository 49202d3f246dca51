"""Evaluation of a pretrained backbone: the weighted kNN monitor and the linear probe.

- kNN: the weighted k-nearest-neighbour classifier of Wu, Xiong, Yu & Lin, "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination" (InstDisc), CVPR 2018 (arXiv:1805.01978), the usual monitor of
  self-supervised runs: L2-normalised pooled last-stage features, the train set as the bank, k = 200 nearest
  by cosine similarity, each voting exp(sim / τ) (τ = 0.1) for its class; top-1 on the test set.
- Linear probe: the backbone frozen in eval mode, a linear layer on its pooled features initialised
  N(0, 0.01), bias 0; SGD momentum 0.9, wd 0, 100 epochs, lr × 0.1 at 60% and 80% of them. Small datasets:
  batch 512, lr 10, RandomResizedCrop(scale 0.08–1) + flip, test at the native size; ImageNet
  (`LinearConfig.imagenet()`, MoCo's protocol, He et al., CVPR 2020): batch 256, lr 30, test resize 256 +
  centre crop 224. Reports the last epoch's test accuracy and, labelled, the best epoch's.

Both read clean images through `viewpipe.trainers.clean` and run distributed (every rank gets the result).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from viewpipe.augment import IMAGENET_MEAN, IMAGENET_STD
from viewpipe.errors import ViewpipeError
from viewpipe.sources import FolderSource, NpzSource, ShardSource, Source, is_labelled
from viewpipe.trainers.clean import (CleanOptions, as_source, dataset_outputs, default_workers, eval_mode,
                                     one_line_errors)


# ---------------------------------------------------------------------------------------------------- kNN
def knn_scores(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
               k: int = 200, t: float = 0.1, chunk: int | None = None) -> torch.Tensor:
    """(Q, num_classes) InstDisc class scores: for each query the k most cosine-similar bank rows (features
    and bank are L2-normalised here) each add exp(sim / t) to its class. Queries go `chunk` at a time (default:
    about 2^26 similarities per chunk) so that a large bank fits."""
    if bank.ndim != 2 or features.ndim != 2 or features.shape[1] != bank.shape[1]:
        raise ViewpipeError(f"knn: features {tuple(features.shape)} and bank {tuple(bank.shape)} must be (Q, D), (N, D)")
    if len(bank) != len(bank_labels) or not len(bank):
        raise ViewpipeError(f"knn: a non-empty bank with one label per row is needed ({len(bank)} rows, "
                            f"{len(bank_labels)} labels)")
    k = max(1, min(k, len(bank)))
    bank = bank.float()  # (no copy for a float32 bank: a large one is divided by its norms, not normalised)
    inv_norm = 1 / torch.linalg.vector_norm(bank, dim=1).clamp_min(1e-12)
    labels = bank_labels.to(bank.device, torch.int64)
    chunk = chunk or max(1, min(4096, 2**26 // len(bank)))
    out = []
    for q in F.normalize(features.float(), dim=1).to(bank.device).split(chunk):
        sim, idx = ((q @ bank.T) * inv_norm).topk(k, dim=1)
        scores = torch.zeros(len(q), num_classes, device=bank.device)
        out.append(scores.scatter_add_(1, labels[idx], (sim / t).exp()))
    return torch.cat(out)


def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int | None = None) -> torch.Tensor:
    """(Q,) int64: the class with the highest weighted kNN score (`knn_scores`); a tie goes to the lowest
    class index (torch.argmax's rule)."""
    return knn_scores(features, bank, bank_labels, num_classes, k, t, chunk).argmax(dim=1)


def _num_classes(*sources: Source) -> int:
    return max(max(len(s.classes), int(np.max(s.labels)) + 1 if len(s.labels) else 0) for s in sources)


def _labels(source: Source, device: torch.device | str = "cpu") -> torch.Tensor:
    """The source's labels as an int64 tensor of their own (a copy: a memory-mapped .npz's labels are
    read-only, and torch.as_tensor on them warns that the NumPy array is not writable)."""
    return torch.from_numpy(np.array(source.labels, dtype=np.int64, copy=True)).to(device)


def _where(data: Source | str | os.PathLike[str], source: Source, split: str) -> str:
    """How an error names a data set: its path (with the split of a .npz)."""
    if isinstance(data, (str, os.PathLike)):
        path = str(data)
    else:
        path = str(getattr(source, "root", None) or getattr(source, "path", None) or type(source).__name__)
    return f"{path} (split {split})" if isinstance(source, NpzSource) else path


def require_labelled(protocol: str, **sets: tuple[Source | str | os.PathLike[str], Source, str]) -> None:
    """A one-line ViewpipeError when one of `sets` (role → (as given, source, split)) has no labels: kNN and
    the linear probe need labelled train and test sets, even when pretraining used unlabelled images."""
    for role, (data, source, split) in sets.items():
        if not is_labelled(source):
            raise ViewpipeError(f"{protocol}: the {role} set {_where(data, source, split)} has no labels (a folder "
                                "without class folders); evaluation needs a labelled set: give an image folder "
                                "root/<class>/<image>, a labelled .npz, or a dataset converted from one")


def set_identity(data: Source | str | os.PathLike[str], split: str = "train") -> tuple[str, str]:
    """(resolved path, split) that names a data set: a .npz's split counts, a folder's or a converted
    dataset's does not (they have one). A Source object without a path is named by its identity."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        npz = path.suffix == ".npz"
    elif isinstance(data, (FolderSource, ShardSource)):
        path, npz = Path(data.root), False
    elif isinstance(data, NpzSource):
        path, npz, split = Path(data.path), True, data.split
    else:
        return f"<{type(data).__name__} at {id(data):#x}>", ""
    return str(path.resolve()), split if npz else ""


def same_set(train_data: Source | str | os.PathLike[str], test_data: Source | str | os.PathLike[str],
             split_train: str = "train", split_test: str = "test") -> bool:
    """Whether the train and test sets are the same images (same resolved path and, for a .npz, split)."""
    return set_identity(train_data, split_train) == set_identity(test_data, split_test)


def pooled_features(backbone: nn.Module, data: Source | str | os.PathLike[str], options: CleanOptions,
                    normalise: bool = False, desc: str = "features") -> torch.Tensor:
    """(N, dim) float32 pooled last-stage features of every clean image in dataset order (eval mode, no grad),
    optionally L2-normalised; on `options.device`, on every rank."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        f = backbone.pooled(x).float()
        return F.normalize(f, dim=1) if normalise else f

    with eval_mode(backbone):
        return dataset_outputs(fn, data, options, desc=desc)


def check_knn_sets(train_data: Source | str | os.PathLike[str], test_data: Source | str | os.PathLike[str],
                   split_train: str = "train", split_test: str = "test",
                   allow_same_set: bool = False) -> tuple[Source, Source]:
    """The kNN bank and test sources, opened, after the checks `knn_accuracy` makes (cheap: no image is read):
    both labelled, and not the same set unless `allow_same_set`; each failure one ViewpipeError line. A
    trainer can call it before training so that its kNN monitor cannot fail late in a run."""
    if not allow_same_set and same_set(train_data, test_data, split_train, split_test):
        raise ViewpipeError(f"kNN: the train set (the bank) and the test set are the same "
                            f"({set_identity(train_data, split_train)[0]}), so every test image finds itself "
                            "and the accuracy is meaningless; give a held-out test set (or allow_same_set / "
                            "--allow-same-set to measure it anyway)")
    train, test = as_source(train_data, split_train), as_source(test_data, split_test)
    require_labelled("kNN", train=(train_data, train, split_train), test=(test_data, test, split_test))
    return train, test


def knn_accuracy(backbone: nn.Module, train_data: Source | str | os.PathLike[str],
                 test_data: Source | str | os.PathLike[str], options: CleanOptions, k: int = 200, t: float = 0.1,
                 split_test: str = "test", allow_same_set: bool = False) -> float:
    """Top-1 % of the weighted kNN classifier on the test set, the train set's features as the bank, both
    passes as `options` say (a training set given as a path is opened with `options.split`, a test set with
    `split_test`). The backbone is put in eval mode and its mode restored. Distributed: every rank takes part
    and gets the same accuracy. Both sets must be labelled; the same set as bank and test (every query finds
    itself: about 100%, meaningless) is refused unless `allow_same_set`."""
    train, test = check_knn_sets(train_data, test_data, options.split, split_test, allow_same_set)
    bank = pooled_features(backbone, train, options, normalise=True, desc="kNN bank")
    queries = pooled_features(backbone, test, options, normalise=True, desc="kNN test")
    pred = knn_predict(queries, bank, _labels(train), _num_classes(train, test), k, t)
    truth = _labels(test, pred.device)
    return float((pred == truth).float().mean().item() * 100)


# ---------------------------------------------------------------------------------------------- linear probe
@dataclass
class LinearConfig:
    """The linear probe (the protocol: this module's docstring). Defaults: the small-dataset protocol.
    `augment=False` departs from it: train features are computed once from clean images (no RandomResizedCrop,
    no flip), which is much faster (on a CPU above all) and usually a little less accurate."""

    epochs: int = 100
    lr: float = 10.0
    batch_size: int = 512
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[float, ...] = (0.6, 0.8)  # fractions of the epochs where lr is multiplied by gamma
    gamma: float = 0.1
    init_std: float = 0.01
    size: int = 32  # side of the training crops and of the test images
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale
    test_resize: int = 0  # 0: test images resized to size×size; > 0: shorter side to this, centre crop size
    augment: bool = True
    workers: int = field(default_factory=default_workers)
    feature_batch_size: int = 256  # batch of the no-grad clean passes
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    split_train: str = "train"
    split_test: str = "test"
    seed: int = 0  # fc init, shuffling, and the crops of workers (with workers=0: torch's global generator)
    progress: bool = True
    backend: str = "torch"  # the backend of the clean passes (`CleanOptions.backend`)
    amp: bool = False  # the clean passes' forward under bf16 autocast

    @classmethod
    def imagenet(cls, **overrides: Any) -> LinearConfig:
        """The ImageNet protocol: 224 crops, batch 256, lr 30, test resize 256 + centre crop 224."""
        return cls(**({"size": 224, "batch_size": 256, "lr": 30.0, "test_resize": 256} | overrides))

    def clean_options(self, device: torch.device | str) -> CleanOptions:
        """The probe's clean passes: the training set's (with `augment=False`) as they are, the test set's with
        `resize=test_resize`."""
        return CleanOptions(size=self.size, batch_size=self.feature_batch_size, workers=self.workers, mean=self.mean,
                            std=self.std, split=self.split_train, device=device, progress=self.progress,
                            backend=self.backend, amp=self.amp)

    def milestone_epochs(self) -> list[int]:
        """The epochs (0-based) from which lr is multiplied once more by gamma: 60 and 80 of 100."""
        return [round(m * self.epochs) for m in self.milestones]


@dataclass
class LinearResult:
    """Test top-1 % after the last epoch (the reported number) and at the best epoch (labelled as such)."""

    last_top1: float
    best_top1: float
    best_epoch: int  # 1-based
    epochs: int
    augment: bool
    history: list[dict[str, float]]  # per epoch: epoch, lr, loss, train_top1, test_top1, seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _AugmentedDataset(torch.utils.data.Dataset):
    """RandomResizedCrop(size, scale) + horizontal flip of each decoded training image, normalised."""

    def __init__(self, source: Source, cfg: LinearConfig) -> None:
        from torchvision import transforms as T

        self.source = source
        self.transform = T.Compose([T.RandomResizedCrop(cfg.size, scale=cfg.scale), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from viewpipe.formats import decode_rgb

        img = decode_rgb(self.source.read(index), self.source.describe(index))
        return self.transform(img), int(self.source.labels[index])


def linear_probe(
    backbone: nn.Module,
    train_data: Source | str | os.PathLike[str],
    test_data: Source | str | os.PathLike[str],
    cfg: LinearConfig,
    device: torch.device | str,
    log: Callable[[str], None] | None = print,
) -> LinearResult:
    """Train a linear classifier on the frozen backbone's pooled features (`LinearConfig`) and return the last and
    best epoch's test top-1. Test features are computed once (the backbone is frozen and the test transform
    fixed); with `cfg.augment` the train features are recomputed from augmented crops every batch. One line
    per epoch goes to `log`. Runs in one process; under torch.distributed every rank runs the whole probe
    (the clean passes are shared among ranks)."""
    device = torch.device(device)
    data = _ProbeData.prepare(backbone, train_data, test_data, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)  # (the head's initialisation, then the feature order)
    fc = nn.Linear(int(data.test_x.shape[1]), data.num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, cfg.init_std, generator=gen)
        fc.bias.zero_()
    fc.to(device)
    opt = torch.optim.SGD(fc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestone_epochs(), gamma=cfg.gamma)
    history: list[dict[str, float]] = []
    best, best_epoch = -1.0, 0
    with eval_mode(backbone):
        for epoch in range(cfg.epochs):
            record = _linear_epoch(backbone, fc, opt, data, cfg, epoch, gen, device)
            sched.step()
            history.append(record)
            if record["test_top1"] > best:
                best, best_epoch = record["test_top1"], epoch + 1
            if log is not None:
                log(f"linear epoch {epoch + 1}/{cfg.epochs}  lr {record['lr']:.4g}  loss {record['loss']:.4f}  "
                    f"train {record['train_top1']:.2f}%  test {record['test_top1']:.2f}%  (best {best:.2f}% at epoch "
                    f"{best_epoch})  {record['seconds']:.1f}s")
    return LinearResult(last_top1=history[-1]["test_top1"], best_top1=best, best_epoch=best_epoch,
                        epochs=cfg.epochs, augment=cfg.augment, history=history)


@dataclass
class _ProbeData:
    """What the probe trains and tests on: the test set's features and labels (computed once), the training
    labels and either its clean features (no augmentation) or a loader of augmented crops."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    train_y: torch.Tensor
    train_x: torch.Tensor | None
    loader: Any
    num_classes: int

    @classmethod
    def prepare(cls, backbone: nn.Module, train_data: Any, test_data: Any, cfg: LinearConfig,
                device: torch.device) -> _ProbeData:
        train, test = as_source(train_data, cfg.split_train), as_source(test_data, cfg.split_test)
        require_labelled("linear probe", train=(train_data, train, cfg.split_train),
                         test=(test_data, test, cfg.split_test))
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise ViewpipeError(f"linear probe: epochs ({cfg.epochs}) and batch size ({cfg.batch_size}) must be ≥ 1")
        num_classes = _num_classes(train, test)
        clean = cfg.clean_options(device)
        test_x = pooled_features(backbone, test, replace(clean, resize=cfg.test_resize), desc="linear test features")
        test_y, train_y = _labels(test, device), _labels(train, device)
        train_x = loader = None
        if not cfg.augment:
            train_x = pooled_features(backbone, train, clean, desc="linear train features")
        else:
            loader = torch.utils.data.DataLoader(
                _AugmentedDataset(train, cfg), batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg.seed))
        return cls(test_x, test_y, train_y, train_x, loader, num_classes)

    def batches(self, batch_size: int, gen: torch.Generator, device: torch.device) -> tuple[Iterable, int]:
        """One epoch's training batches (x, y) and their count: augmented crops, or the clean features shuffled."""
        if self.loader is not None:
            return one_line_errors(self.loader), len(self.loader)
        order = torch.randperm(len(self.train_x), generator=gen).to(device)  # type: ignore[arg-type]
        return (((self.train_x[i], self.train_y[i]) for i in order.split(batch_size)),  # type: ignore[index]
                math.ceil(len(order) / batch_size))


def _linear_epoch(backbone: nn.Module, fc: nn.Linear, opt: torch.optim.Optimizer, data: _ProbeData,
                  cfg: LinearConfig, epoch: int, gen: torch.Generator, device: torch.device) -> dict[str, float]:
    """One epoch of the head's training, then its test top-1: the epoch's record."""
    from tqdm import tqdm

    t0, lr = time.perf_counter(), opt.param_groups[0]["lr"]
    batches, total = data.batches(cfg.batch_size, gen, device)
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in tqdm(batches, total=total, desc=f"linear {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                     disable=None if cfg.progress else True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if data.loader is not None:
            with torch.no_grad():
                x = backbone.pooled(x).float()
        logits = fc(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    with torch.no_grad():
        test_top1 = float((fc(data.test_x).argmax(1) == data.test_y).float().mean()) * 100
    return {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(1, seen), "train_top1": 100.0 * correct / max(1, seen),
            "test_top1": test_top1, "seconds": time.perf_counter() - t0}
