"""BYOL: Grill, Strub, Altché, Tallec, Richemond et al., "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning", NeurIPS 2020 (arXiv:2006.07733).

An online network (backbone → projector → predictor q) regresses the target network's projection of the other
view; the target (backbone → projector) is an exponential moving average of the online one and receives no
gradient. With p = q(online projection) and z = target projection, both L2-normalised,

    ℓ(p, z) = ‖p̄ − z̄‖² = 2 − 2·cos(p, z),    L = ℓ(p₁, z₂) + ℓ(p₂, z₁)   (averaged over the batch)

and after each step ξ ← τ_k·ξ + (1 − τ_k)·θ with τ_k = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2 (k steps done of K):
from τ_base up to 1 by a half cosine. τ_k is recomputed from the engine's `progress` = k/K, so a resumed run
follows the same schedule; the target's BN statistics are its own buffers (as MoCo's key encoder), in the
state dict. Two views of each sample, no multi-crop (`views = (2, 2)`).

ContrastiveCrop's BYOL host on small datasets (`models/byol.py`, `DDP_byol_ccrop.py`, configs/small/*/byol_*.py):
projector backbone → 512 → 128 (Linear-BN-ReLU-Linear), predictor 128 → 512 → 128, τ 0.996, the loss
−2·(cos(p₁, z₂) + cos(p₂, z₁)) (L − 4: the same gradients). Departures from that release: its momentum is
constant (here the paper's cosine schedule; `cosine_momentum=False` keeps it constant), its target starts from
another random initialisation (here a copy of the online network, as the paper), and it updates the target
before each step's forward (here after the optimizer step, as the paper). ImageNet (the official
byol/configs/byol.py): projector 2048 → 4096 → 256, predictor 256 → 4096 → 256.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.base import Method, momentum_update, register
from viewpipe.trainers.models import Backbone, mlp


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 − 2·cos(p, stopgrad(z)), averaged over the batch: ‖p̄ − z̄‖² of the L2-normalised vectors."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def cosine_momentum_at(base: float, progress: float) -> float:
    """BYOL's target decay after the fraction `progress` = k/K of training: 1 − (1 − base)·(cos(π·k/K) + 1)/2."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@register("byol")
class BYOL(Method):
    """BYOL. Defaults: the small-dataset ContrastiveCrop recipe (projector backbone.dim → hidden 512 → dim 128
    with BN in the hidden layer, predictor dim → pred_hidden 512 → dim, τ_base 0.996) with the paper's cosine
    momentum schedule (`cosine_momentum`). ImageNet: dim 256, hidden 4096, pred_hidden 4096."""

    views = (2, 2)

    def __init__(self, backbone: Backbone, dim: int = 128, hidden: int = 512, pred_hidden: int = 512,
                 momentum: float = 0.996, cosine_momentum: bool = True) -> None:
        """Args:
            dim: width of the projection z and of the prediction p.
            hidden: width of the projector's hidden layer (0: the backbone's width).
            pred_hidden: width of the predictor's hidden layer.
            momentum: τ_base of the target's EMA, ξ ← τ·ξ + (1−τ)·θ.
            cosine_momentum: raise τ from τ_base to 1 by a half cosine over training (the paper), else keep it.
        """
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ViewpipeError(f"byol momentum = {momentum}: expected τ_base in [0, 1]")
        hidden = hidden or backbone.dim
        self.backbone = backbone
        self.projector = mlp([backbone.dim, hidden, dim])
        self.predictor = mlp([dim, pred_hidden, dim])
        self.target_backbone, self.target_projector = copy.deepcopy(backbone), copy.deepcopy(self.projector)
        for p in [*self.target_backbone.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)
        self.base_momentum, self.cosine_momentum = momentum, cosine_momentum

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The target network's projection of a batch of images (no gradient)."""
        return self.target_projector(self.target_backbone.pooled(x))

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = views[0], views[1]
        p1 = self.predictor(self.projector(self.backbone.pooled(x1)))
        p2 = self.predictor(self.projector(self.backbone.pooled(x2)))
        z1, z2 = self.target(x1), self.target(x2)
        return regression_loss(p1, z2) + regression_loss(p2, z1), {}

    def momentum_at(self, progress: float) -> float:
        """τ after the fraction `progress` of training: the cosine schedule from τ_base, or τ_base throughout."""
        return cosine_momentum_at(self.base_momentum, progress) if self.cosine_momentum else self.base_momentum

    def after_step(self, progress: float) -> None:
        m = self.momentum_at(progress)
        momentum_update(self.backbone, self.target_backbone, m)
        momentum_update(self.projector, self.target_projector, m)
