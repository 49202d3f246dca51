"""The training engine every method runs on: loaders from any backend over the live SampleState, the epoch
loop with AMP (bf16 on the GPU), channels_last, SGD/LARS/AdamW with warm-up and cosine, DDP (torchrun; NCCL
on the GPU, gloo on the CPU), SyncBN, logging (console, progress bar, JSONL) with throughput and the time
spent waiting for data, the ContrastiveCrop box updates and the kNN monitor, atomic checkpoints and exact
resume of everything (model, optimizer, queues, sample state, RNG states, epoch and batch within it)."""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from viewpipe.augment import preset
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import LoaderConfig, get_backend
from viewpipe.sources import open_source
from viewpipe.state import SampleState
from viewpipe.trainers.base import DataContext, Method, broadcast_bn_stats
from viewpipe.trainers.config import TrainConfig, to_dict
from viewpipe.trainers.models import build_backbone

METHODS: dict[str, str] = {
    "mocov2": "viewpipe.trainers.mocov2:MoCoV2",
    "simsiam": "viewpipe.trainers.simsiam:SimSiam",
    "csml": "viewpipe.trainers.csml:CsMl",
    "snclr": "viewpipe.trainers.snclr:SNCLR",
}


def build_method(cfg: TrainConfig) -> Method:
    """The method of `cfg` on a fresh backbone, with `cfg.method_args`."""
    if cfg.method not in METHODS:
        raise ViewpipeError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
    module, name = METHODS[cfg.method].split(":")
    cls = getattr(importlib.import_module(module), name)
    try:
        return cls(build_backbone(cfg.backbone), **cfg.method_args)
    except TypeError as exc:
        raise ViewpipeError(f"method_args for {cfg.method}: {exc}") from None


# ---------------------------------------------------------------------------------------------- optimisation
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in MoCo v3/BYOL: SGD with momentum whose update is scaled per parameter by
    trust · ‖w‖ / ‖g + wd·w‖; biases and BN parameters (1-d) get neither weight decay nor the scaling."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    wn, dn = torch.norm(p), torch.norm(d)
                    scale = torch.where((wn > 0) & (dn > 0), g["trust"] * wn / dn, torch.ones_like(wn))
                    d = d.mul(scale)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "lars":
        return LARS(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    raise ViewpipeError(f"optim.name {o.name!r}: expected sgd, lars or adamw")


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine from lr to lr·final_lr_ratio; per epoch or per step."""
    o = cfg.optim
    t = epoch + (0 if o.per_epoch else step_in_epoch / max(1, steps_per_epoch))
    if t < o.warmup_epochs:
        return o.lr * (t + (1 if o.per_epoch else 0)) / (o.warmup_epochs + (1 if o.per_epoch else 0))
    span = max(1e-9, cfg.epochs - o.warmup_epochs)
    final = o.lr * o.final_lr_ratio
    return final + (o.lr - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - o.warmup_epochs) / span)))


# ---------------------------------------------------------------------------------------------- run context
def setup_distributed(device: str) -> tuple[torch.device, int, int, int]:
    """(device, rank, world, local rank). Under torchrun (WORLD_SIZE > 1) the process group is initialised
    here: NCCL on the GPU, gloo on the CPU."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ViewpipeError("device=cuda but torch sees no GPU; use device=auto or cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if want_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world, local
    return torch.device("cpu"), rank, world, local


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save into a temporary file beside `path`, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """One pretraining run of `cfg` in this process (one rank under torchrun). `fit()` trains from the start or
    from `resume` (a checkpoint path; "auto": `out/last.pt` when it exists) and returns the final metrics."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        if not cfg.data.path:
            raise ViewpipeError("data.path is empty: give the training data (data.path=... or a config file)")
        self.device, self.rank, self.world, self.local_rank = setup_distributed(cfg.device)
        self.main = self.rank == 0
        self.out = Path(cfg.out)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed((cfg.seed + self.rank) % 2**32)
        random.seed(cfg.seed + self.rank)

        d = cfg.data
        self.source = open_source(d.path, d.split)
        self.n = len(self.source)
        if d.batch_size % self.world:
            raise ViewpipeError(f"data.batch_size {d.batch_size} is not divisible by the {self.world} ranks")
        self.augment = preset(d.preset, size=d.size)

        self.method = build_method(cfg).to(self.device)
        if cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.world > 1:
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.model: nn.Module = self.method
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():  # queues are identical on every rank: never broadcast them per step
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.model = nn.parallel.DistributedDataParallel(self.method, device_ids=ids,
                                                                 broadcast_buffers=False)
        self.optimizer = build_optimizer(cfg, self.method.param_groups())
        for g in self.optimizer.param_groups:
            g.setdefault("fix_lr", False)

        self.state = self._sample_state()
        self.data = DataContext(self.source, self.state, self.device, d.size, d.batch_size // self.world, d.workers,
                                tuple(self.augment.mean), tuple(self.augment.std), writer=self.local_rank == 0)
        from viewpipe.trainers.ccrop import BoxUpdater

        self.boxes = BoxUpdater(cfg, self.source, self.augment, self.out)
        self.epoch, self.step, self.history = 0, 0, []
        self._loader, self._loader_box = None, None
        self._resume_loader: dict | None = None
        if resume == "auto":
            resume = str(self.out / "last.pt") if (self.out / "last.pt").is_file() else None
        if resume:
            self.load(Path(resume))
        self._log = open(self.out / "log.jsonl", "a") if self.main else None

    # ------------------------------------------------------------------ sample state and loader
    def _sample_state(self) -> SampleState:
        """Local rank 0 of each node creates the node's segment, then the other ranks attach by name."""
        k = self.method.needs_neighbours()
        state = SampleState.create(self.n, neighbours=k) if self.local_rank == 0 else None
        if self.world == 1:
            return state
        names = [None] * self.world
        dist.all_gather_object(names, state.name if state is not None else None)  # (after the creation)
        return state if state is not None else SampleState.attach(names[self.rank - self.local_rank])

    def loader(self, epoch: int) -> Any:
        """The backend's loader for `epoch`: ContrastiveCrop boxes once the first update has happened, plain
        RandomResizedCrop before (the loader is rebuilt once, when that changes)."""
        use_box = self.boxes.use_box(epoch)
        if self._loader is None or use_box != self._loader_box:
            if self._loader is not None and hasattr(self._loader, "close"):
                self._loader.close()
            d = self.cfg.data
            lc = LoaderConfig(views=d.views, batch_size=d.batch_size // self.world,
                              crop=CropConfig(alpha=self.cfg.ccrop.alpha, use_box=use_box), augment=self.augment,
                              workers=d.workers, seed=self.cfg.seed, channels_last=self.cfg.channels_last)
            kw: dict[str, Any] = {"rank": self.rank, "world": self.world}
            if self.method.needs_neighbours():
                kw["companions"] = True
            if d.backend == "dali":
                kw["hw_decoder_load"] = d.hw_decoder_load
            data = d.path if d.backend == "ffcv" else self.source
            self._loader, self._loader_box = get_backend(d.backend)(data, lc, self.state, **kw), use_box
        return self._loader

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, loader_state: dict) -> dict:
        rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        return {
            "config": to_dict(self.cfg), "epoch": self.epoch, "step": self.step, "loader": loader_state,
            "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sample_state": self.state.state_dict(), "box_updates": self.boxes.updates, "history": self.history,
            "rng": rng,
            # what `viewpipe eval` needs
            "backbone_name": self.cfg.backbone, "backbone": self.method.backbone.state_dict(),
            "image_size": self.cfg.data.size, "mean": tuple(self.augment.mean), "std": tuple(self.augment.std),
        }

    def save(self, loader_state: dict) -> None:
        ckpt = self.checkpoint(loader_state)  # (collective: every rank takes part)
        if self.main:
            save_atomic(ckpt, self.out / "last.pt")

    def load(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as exc:
            raise ViewpipeError(f"{path}: cannot read the checkpoint ({exc}); give another with --resume") from None
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.local_rank == 0:
            self.state.load_state_dict(ckpt["sample_state"])
        self.boxes.updates = ckpt["box_updates"]
        self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        self._resume_loader = ckpt["loader"]
        rng = ckpt["rng"]
        _set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        if self.world > 1:
            dist.barrier()  # the sample state is restored before any rank's loader reads it

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        from tqdm import tqdm

        steps_this_run, stop = 0, False
        last: dict = {}
        while self.epoch < cfg.epochs and not stop:
            epoch = self.epoch
            resume = self._resume_loader if self._resume_loader and self._resume_loader["epoch"] == epoch else None
            before = self.method.before_epoch(epoch, self.data) if resume is None or resume["batch"] == 0 else {}
            loader = self.loader(epoch)
            if resume is not None:
                loader.load_state_dict(resume)
                start = resume["batch"]
            else:
                loader.set_epoch(epoch)
                start = 0
            self._resume_loader = None
            self.method.set_epoch(epoch)
            self.model.train()
            steps = len(loader)
            total = cfg.epochs * steps
            bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}", unit="step", leave=False,
                       disable=None if self.main else True)
            wait = busy = 0.0
            images = 0
            loss_sum, loss_n = torch.zeros((), device=self.device), 0
            t_prev = time.perf_counter()
            b = start
            for batch in loader:
                t_data = time.perf_counter()
                lr = lr_at(cfg, epoch, b, steps)
                loss, logs = self.train_step(batch, lr, (self.step + 1) / total)
                loss_sum, loss_n = loss_sum + loss.detach().float(), loss_n + 1
                self.step, b, steps_this_run = self.step + 1, b + 1, steps_this_run + 1
                if self.device.type == "cuda" and (self.step % cfg.log_every == 0):
                    torch.cuda.synchronize()
                now = time.perf_counter()
                wait, busy, t_prev = wait + (t_data - t_prev), busy + (now - t_data), now
                images += len(batch[2]) * self.world
                bar.update(1)
                if self.step % cfg.log_every == 0 or b == steps:
                    last = {"step": self.step, "epoch": epoch, "batch": b, "loss": float(loss.detach()), "lr": lr,
                            **{k: float(v) for k, v in logs.items()},
                            "images_per_s": images / max(1e-9, wait + busy),
                            "data_wait": wait / max(1e-9, wait + busy)}
                    self.log(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}",
                                    wait=f"{100 * last['data_wait']:.0f}%")
                    wait = busy = 0.0
                    images = 0
                if cfg.save_every and self.step % cfg.save_every == 0 and b < steps:
                    self.save({"epoch": epoch, "batch": b})
                if cfg.max_steps and steps_this_run >= cfg.max_steps:
                    stop = True
                    break
            bar.close()
            if stop and b < steps:
                self.save({"epoch": epoch, "batch": b})
                break
            self.epoch = epoch + 1
            broadcast_bn_stats(self.method)  # one network for the passes below and the next epoch's mining
            # the epoch's mean loss (of the batches this process ran: after a resume, those after the checkpoint)
            record: dict = {"epoch": epoch, "step": self.step, "loss": float(loss_sum) / max(1, loss_n), **before}
            if self.boxes.due(epoch):
                record |= self.boxes.update(self.method.backbone, self.state, self.device, epoch,
                                            writer=self.local_rank == 0, main=self.main)
            if self.cfg.data.test_path and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0
                                                              or epoch + 1 == cfg.epochs):
                record["knn_top1"] = self.knn()
            self.history.append(record)
            if self.main:
                print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                                if v is not None), flush=True)
            self.log({"event": "epoch", **record})
            self.save({"epoch": self.epoch, "batch": 0})
        return {"epoch": self.epoch, "step": self.step, "history": self.history, "last": last}

    def train_step(self, batch: tuple, lr: float, progress: float) -> tuple[torch.Tensor, dict]:
        """One optimizer step on a loader batch `(views, labels, indices[, neighbours])`."""
        views = [v.to(self.device, non_blocking=True) for v in batch[0]]
        if self.cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        info = {"labels": batch[1], "indices": batch[2]}
        if len(batch) > 3:
            info["neighbours"] = batch[3]
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr if g["fix_lr"] else lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.cfg.amp):
            loss, logs = self.model(views, info)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step(progress)
        return loss, logs

    def knn(self) -> float:
        from viewpipe.trainers.eval import knn_accuracy

        d = self.cfg.data
        test = open_source(d.test_path, d.test_split)
        return knn_accuracy(self.method.backbone, self.source, test, d.size, self.device, k=self.cfg.knn_k,
                            t=self.cfg.knn_t, mean=self.augment.mean, std=self.augment.std, workers=d.workers)

    def close(self) -> None:
        if self._loader is not None and hasattr(self._loader, "close"):
            self._loader.close()
        if self._log is not None:
            self._log.close()
        self.state.close()


def pretrain(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Train `cfg` to its end (or `max_steps`) and return the final metrics."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()
