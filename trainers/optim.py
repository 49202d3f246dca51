"""Optimisation for pretraining: the optimizers a config names (SGD, LARS, AdamW) and the learning-rate
schedule (linear warm-up, then cosine), stepped per epoch or per step.

LARS: You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks" (arXiv:1708.03888), in the form
MoCo v3 and BYOL use: SGD with momentum whose update is scaled per weight tensor by trust · ‖w‖ / ‖g + wd·w‖;
biases and BatchNorm parameters (1-d) get neither weight decay nor the scaling.

Schedule: lr rises linearly over `optim.warmup_epochs`, then follows a half cosine from lr down to
lr · `optim.final_lr_ratio` at the last epoch. The official ContrastiveCrop code steps it once per epoch
(`optim.per_epoch`, the default); MoCo v3's recipe (SNCLR) per step. Parameter groups marked `fix_lr` keep
the base lr throughout (SimSiam's predictor).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3/BYOL: SGD with momentum whose update is scaled per parameter by
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
    """The optimizer `cfg.optim` names over the method's parameter `groups`; every group gets a `fix_lr` flag
    (False unless the method set it)."""
    o = cfg.optim
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                                                     weight_decay=o.weight_decay)
    elif o.name == "lars":
        opt = LARS(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    elif o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    else:
        raise ViewpipeError(f"optim.name {o.name!r}: expected sgd, lars or adamw")
    for g in opt.param_groups:
        g.setdefault("fix_lr", False)
    return opt


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine from lr to lr·final_lr_ratio; per epoch or per step."""
    o = cfg.optim
    t = epoch + (0 if o.per_epoch else step_in_epoch / max(1, steps_per_epoch))
    if t < o.warmup_epochs:
        return o.lr * (t + (1 if o.per_epoch else 0)) / (o.warmup_epochs + (1 if o.per_epoch else 0))
    span = max(1e-9, cfg.epochs - o.warmup_epochs)
    final = o.lr * o.final_lr_ratio
    return final + (o.lr - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - o.warmup_epochs) / span)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """This step's `lr` on every parameter group, `base_lr` on those marked `fix_lr`."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr if g["fix_lr"] else lr
