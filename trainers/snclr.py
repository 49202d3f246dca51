"""SNCLR: Ge, Wang, Tong, Chen, Song & Luo, "Soft Neighbors are Positive Supporters in Contrastive Visual
Representation Learning", ICLR 2023 (code: github.com/ChongjianGE/SNCLR). Instance discrimination labels every
other image a negative, even one of the same class; SNCLR lets an image's nearest neighbours support it as
soft positives, each weighted by how "positive" it is for the anchor (its positiveness).

The network is MoCo v3's (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021, arXiv:2104.02057): an online backbone → projector → predictor and a momentum
backbone → projector, the momentum following a half cosine from its base value to 1. Its targets are each key
together with its K nearest neighbours in a bank of past keys.

Per direction (view 1 queries, view 2 keys, then swapped): the momentum encoder's key y₂ of view 2 finds its
top-K neighbours in the FIFO bank by cosine; all ranks' [key, K neighbours] rows are the candidates; the
logits are norm(predictor output of view 1) · candidatesᵀ / τ; the soft target is 1 at the anchor's own key
and w_i at its own neighbours, where w is the official parameter-free positiveness, softmax over the K
neighbours of cos(y₁, nn_i) with y₁ the online *projector* output of view 1 (no temperature, not detached).
Loss = mean(−Σ target · log_softmax(logits)) · 2τ; the bank receives view 2's keys after the step's queries.
Options: the paper's learned attention (`attention="learned"`: softmax(f₁(y₁)·f₂(nn)ᵀ/√d) × γ), the paper's
log outside the weighted sum (`log_of_sum=True`), and the official code's `threshold` (weights ≤ 1/K zeroed).

Departure from the release: its bank is per GPU (each GPU enqueues its own keys); here the bank is shared, every
step enqueues all ranks' view-2 keys, so ranks search the same candidates and a checkpoint holds the whole bank.
To keep the candidates as recent as the release's, size it as the per-GPU size × GPUs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from viewpipe.errors import ViewpipeError
from viewpipe.dist import gather_ranks, rank_world
from viewpipe.trainers.base import Method, momentum_update, register
from viewpipe.trainers.models import Backbone, ViT, mlp
from viewpipe.trainers.mocov2 import enqueue


@torch.no_grad()
def bank_neighbours(keys: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The (B, k, dim) entries of `bank` (dim, size) most similar by cosine to each L2-normalised key (B, dim),
    most similar first."""
    idx = (keys @ bank).topk(k, dim=1).indices
    return bank.T[idx]


def positiveness(y: torch.Tensor, nn_: torch.Tensor, attention: nn.Module | None = None, gamma: float = 1.0,
                 threshold: bool = False) -> torch.Tensor:
    """(B, K) weights of each anchor's K neighbours. Official (`attention=None`): softmax over the K of
    cos(y, nn_i), no temperature, not detached. Learned: γ · softmax(f₁(y) · f₂(nn)ᵀ / √d). `threshold`
    zeroes weights ≤ 1/K (an option of the official code)."""
    if attention is None:
        w = torch.einsum("bd,bkd->bk", F.normalize(y, dim=1), F.normalize(nn_, dim=2)).softmax(dim=1)
    else:
        w = gamma * attention(y, nn_)
    if threshold:
        w = w * (w > 1.0 / nn_.shape[1])
    return w


class LearnedAttention(nn.Module):
    """The paper's positiveness: softmax over the K neighbours of f₁(y) · f₂(nn)ᵀ / √d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.f1, self.f2, self.scale = nn.Linear(dim, dim), nn.Linear(dim, dim), dim ** -0.5

    def forward(self, y: torch.Tensor, nn_: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("bd,bkd->bk", self.f1(y), self.f2(nn_)) * self.scale).softmax(dim=1)


def soft_neighbour_loss(p: torch.Tensor, key: torch.Tensor, nn_: torch.Tensor, w: torch.Tensor, tau: float,
                        log_of_sum: bool = False) -> torch.Tensor:
    """One direction of SNCLR's loss. `p` (B, d): the predictor output of the query view; `key` (B, d) and
    `nn_` (B, K, d): the other view's momentum key and its bank neighbours; `w` (B, K): positiveness. The
    candidates are all ranks' [key, K neighbours] rows; the target is 1 at the anchor's key and w at its own
    neighbours. Returns mean(−Σ target · log_softmax(logits)) · 2τ, or with `log_of_sum` the paper's
    −log Σ target · softmax(logits), also × 2τ."""
    B, K = w.shape
    cand = gather_ranks(torch.cat([key[:, None], nn_], 1).detach())  # (G·B, K+1, d), rank-major
    logits = F.normalize(p.float(), dim=1) @ F.normalize(cand.flatten(0, 1).float(), dim=1).T / tau
    logp = logits.log_softmax(dim=1)
    rank = rank_world()[0]
    own = logp.view(B, -1, K + 1)[torch.arange(B), rank * B + torch.arange(B)]  # (B, K+1): key, then neighbours
    target = torch.cat([torch.ones_like(w[:, :1]), w], 1).float()
    if log_of_sum:
        return -torch.logsumexp(own + target.clamp_min(1e-30).log(), dim=1).mean() * 2 * tau
    return -(target * own).sum(dim=1).mean() * 2 * tau


@register("snclr")
class SNCLR(Method):
    """SNCLR on MoCo v3. Defaults: the MoCo v3 ResNet recipe (projector 2 layers backbone → 4096 → 256 with
    BN, last BN without affine; predictor 256 → 4096 → 256; τ 1.0; momentum 0.99 → 1 by cosine) with the
    release's SNCLR settings (K = 30, bank of random unit vectors at the start). ViT backbones get MoCo v3's
    3-layer projector and a predictor ending in BN. As in MoCo v3's and the release's `_build_mlp`, no Linear
    has a bias; `pred_bias=True` gives the ResNet predictor's last Linear one (viewpipe's earlier default).
    Recipes: CNN, MoCo v3's ResNet-50 one (the release has no CNN builder): LARS lr 0.6, wd 1e-6, SyncBN; ViT-S,
    the release's: AdamW wd 0.1 with torch's default betas, τ 0.2, SyncBN, the release's ViT-S (`vit_small`)."""

    def __init__(self, backbone: Backbone, dim: int = 256, mlp_dim: int = 4096, bank: int = 65536, topk: int = 30,
                 tau: float = 1.0, momentum: float = 0.99, cosine_momentum: bool = True, attention: str = "cosine",
                 gamma: float = 1.0, log_of_sum: bool = False, threshold: bool = False, proj_layers: int = 0,
                 pred_bias: bool = False) -> None:
        """Args:
            dim: width of the projector's and predictor's output.
            mlp_dim: width of the projector's and predictor's hidden layers.
            bank: keys in the FIFO bank the neighbours are searched in (shared by the ranks).
            topk: K, neighbours of each key taken as soft positives.
            tau: temperature τ of the logits.
            momentum: base momentum of the key encoder's EMA.
            cosine_momentum: raise the momentum from its base to 1 along a half cosine over training.
            attention: how neighbours are weighted: cosine (the release's, parameter-free) or learned (the paper's).
            gamma: γ, the scale of the learned attention's weights.
            log_of_sum: the paper's loss, the log outside the weighted sum (default: the release's sum of logs).
            threshold: zero the weights ≤ 1/K (an option of the release).
            proj_layers: layers of the projector (0: 3 for a ViT, 2 otherwise).
            pred_bias: give the predictor's last Linear a bias.
        """
        super().__init__()
        if attention not in ("cosine", "learned"):
            raise ViewpipeError(f"snclr attention {attention!r}: expected cosine (the release) or learned (the paper)")
        if not 0 < topk <= bank:
            raise ViewpipeError(f"snclr topk = {topk} must be between 1 and the bank size ({bank})")
        vit = isinstance(backbone, ViT)
        layers = proj_layers or (3 if vit else 2)
        self.backbone = backbone
        self.projector = mlp([backbone.dim] + [mlp_dim] * (layers - 1) + [dim], last_bn=True, last_bn_affine=False)
        self.predictor = mlp([dim, mlp_dim, dim], last_bn=vit, last_bn_affine=False, last_bias=pred_bias)
        self.key_backbone, self.key_projector = copy.deepcopy(backbone), copy.deepcopy(self.projector)
        for p in [*self.key_backbone.parameters(), *self.key_projector.parameters()]:
            p.requires_grad_(False)
        self.attention = LearnedAttention(dim) if attention == "learned" else None
        self.topk, self.tau, self.gamma, self.log_of_sum, self.threshold = topk, tau, gamma, log_of_sum, threshold
        self.base_momentum, self.cosine_momentum = momentum, cosine_momentum
        self.register_buffer("bank", F.normalize(torch.randn(dim, bank), dim=0))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = views[0], views[1]
        y1, y2 = self.projector(self.backbone.pooled(x1)), self.projector(self.backbone.pooled(x2))
        p1, p2 = self.predictor(y1), self.predictor(y2)
        with torch.no_grad():
            k1, k2 = (F.normalize(self.key_projector(self.key_backbone.pooled(x)).float(), dim=1) for x in (x1, x2))
            bank = self.bank.clone()
            nn1, nn2 = bank_neighbours(k1, bank, self.topk), bank_neighbours(k2, bank, self.topk)
        w1 = positiveness(y1, nn2, self.attention, self.gamma, self.threshold)  # view 1's weights of y₂'s neighbours
        w2 = positiveness(y2, nn1, self.attention, self.gamma, self.threshold)
        loss = (soft_neighbour_loss(p1, k2, nn2, w1, self.tau, self.log_of_sum)
                + soft_neighbour_loss(p2, k1, nn1, w2, self.tau, self.log_of_sum))
        enqueue(self.bank, self.bank_ptr, k2)
        with torch.no_grad():  # how peaked the positiveness is: 1/K when uniform, 1 when one neighbour takes all
            peak = w1.detach().max(dim=1).values.mean()
        return loss, {"w_max": peak}

    def momentum_at(self, progress: float) -> float:
        """MoCo v3's schedule: from the base momentum to 1 by a half cosine over training (or constant)."""
        if not self.cosine_momentum:
            return self.base_momentum
        return 1 - (1 - self.base_momentum) * 0.5 * (1 + math.cos(math.pi * progress))

    def after_step(self, progress: float) -> None:
        m = self.momentum_at(progress)
        momentum_update(self.backbone, self.key_backbone, m)
        momentum_update(self.projector, self.key_projector, m)
