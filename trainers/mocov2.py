"""MoCo v2: Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning" (arXiv:2003.04297),
MoCo (He, Fan, Wu, Xie & Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR
2020, arXiv:1911.05722) with an MLP head, stronger augmentation (blur: "aug+") and a cosine schedule.

A query encoder f_q (backbone → MLP head → L2-normalised q) is trained by InfoNCE to pick its key k₊, the
momentum encoder's embedding of the other view, among k₊ and a FIFO queue Q of past keys:

    ℓ(q, k₊) = −log( exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_{n∈Q} exp(q·n/τ)) )

The key encoder is not trained by gradients: θ_k ← m·θ_k + (1−m)·θ_q after each step; each step's keys enter
the queue and the oldest leave. Multi-crop (Caron et al., SwAV, NeurIPS 2020): views after the first two (small
crops of the same image, `data.multicrop`) are extra queries against the same key k₊; the loss averages over
all queries. Keys are computed with shuffle-BN across ranks (`base.shuffle_bn_forward`).
ContrastiveCrop's host method on small datasets (512-512-128 head, queue 65,536, m 0.999, τ 0.2) and on
ImageNet (ResNet-50, batch 256, SGD lr 0.03 wd 1e-4, 2048-2048-128 head, τ 0.2, 100 epochs); CsMl builds on it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from viewpipe.dist import gather_ranks
from viewpipe.trainers.base import Method, momentum_update, register, shuffle_bn_forward
from viewpipe.trainers.models import Backbone, mlp


class Encoder(nn.Module):
    """Backbone → pooled → MLP head → L2-normalised embedding."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone.pooled(x)), dim=1)


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """−log softmax of the positive among [q·k, q·queue] / τ, averaged: MoCo's loss (queue is (dim, K))."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits.float(), torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write all ranks' keys (B, ..., dim) into a FIFO `queue` (..., dim, K) at `ptr`, wrapping around, and
    advance `ptr`. The same on every rank, so ranks keep identical queues and a checkpoint holds all of it."""
    keys = gather_ranks(keys)
    K = queue.shape[-1]
    idx = (ptr + torch.arange(len(keys), device=keys.device)) % K
    queue[..., idx] = keys.movedim(0, -1).to(queue.dtype)
    ptr.copy_((ptr + len(keys)) % K)


@register("mocov2")
class MoCoV2(Method):
    """MoCo v2. Defaults are the small-dataset ContrastiveCrop recipe (512-512-128 head, queue 65,536,
    m 0.999, τ 0.2); ImageNet: hidden = 2048 (the backbone's width), τ 0.2, m 0.999. `symmetric` adds the
    loss with the views swapped (and enqueues both views' keys). Shuffle-BN across ranks for the keys unless
    the engine converted BN to SyncBN (`shuffle_bn=False`)."""

    def __init__(self, backbone: Backbone, dim: int = 128, hidden: int = 0, queue: int = 65536,
                 momentum: float = 0.999, tau: float = 0.2, symmetric: bool = False, shuffle_bn: bool = True) -> None:
        """Args:
            dim: width of the embedding q (the head's output).
            hidden: width of the head's hidden layer (0: the backbone's width).
            queue: keys in the FIFO queue of negatives.
            momentum: m of the key encoder's EMA, θ_k ← m·θ_k + (1−m)·θ_q.
            tau: temperature τ of InfoNCE.
            symmetric: add the loss with the views swapped (and enqueue both views' keys).
            shuffle_bn: shuffle the keys' batch across ranks for BatchNorm (MoCo's shuffle-BN).
        """
        super().__init__()
        hidden = hidden or backbone.dim
        self.backbone = backbone
        self.query = Encoder(backbone, mlp([backbone.dim, hidden, dim], hidden_bn=False))
        self.key = copy.deepcopy(self.query)
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.momentum, self.tau, self.symmetric, self.shuffle_bn = momentum, tau, symmetric, shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle_bn_forward(self.key, x) if self.shuffle_bn else self.key(x)

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = views[0], views[1]
        k2 = self._keys(x2)
        queue = self.queue.clone().detach()
        queries = [x1, *views[2:]]  # multi-crop: the small views are extra queries against k2
        loss = sum(infonce(self.query(x), k2, queue, self.tau) for x in queries) / len(queries)
        keys = [k2]
        if self.symmetric:
            q2, k1 = self.query(x2), self._keys(x1)
            loss = loss + infonce(q2, k1, queue, self.tau)
            keys.append(k1)
        for k in keys:
            enqueue(self.queue, self.queue_ptr, k)
        return loss, {}

    def after_step(self, progress: float) -> None:
        momentum_update(self.query, self.key, self.momentum)
