"""SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv:2011.10566).

Two views through one encoder f (backbone → projector) give z₁, z₂; a predictor h gives p₁ = h(z₁) and
p₂ = h(z₂). With D(p, z) = −cos(p, stopgrad(z)) the loss is symmetric:

    L = ½ D(p₁, z₂) + ½ D(p₂, z₁)

No negatives and no momentum encoder: the stop-gradient is what prevents collapse (the log's `z_std`, the
per-dimension std of the normalised output, watches for it: 1/√dim when healthy). ContrastiveCrop's SimSiam
host on small datasets: a 3-layer 512 projector (BN after each layer, the last without affine), predictor
512 → 128 → 512 whose lr stays fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from viewpipe.trainers.base import Method, register
from viewpipe.trainers.models import Backbone, mlp


def neg_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−cos(p, stopgrad(z)), averaged over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


@register("simsiam")
class SimSiam(Method):
    """SimSiam. Defaults: the small-dataset recipe (3-layer projector of width `dim` with BN after each layer,
    the last without affine; predictor dim → pred_hidden → dim; the predictor's lr fixed at the base lr).
    ImageNet: dim 2048, pred_hidden 512."""

    def __init__(self, backbone: Backbone, dim: int = 512, pred_hidden: int = 128, fix_pred_lr: bool = True) -> None:
        """Args:
            dim: width of the projector's layers and of z.
            pred_hidden: width of the predictor's hidden layer (the bottleneck).
            fix_pred_lr: keep the predictor's lr at the base lr (no schedule), as the paper.
        """
        super().__init__()
        self.backbone = backbone
        self.projector = mlp([backbone.dim, dim, dim, dim], last_bn=True, last_bn_affine=False)
        self.predictor = mlp([dim, pred_hidden, dim])
        self.fix_pred_lr = fix_pred_lr

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.pooled(x))

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.project(views[0]), self.project(views[1])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))
        with torch.no_grad():  # collapse monitor: std of the normalised output (1/sqrt(dim) when healthy)
            std = F.normalize(z1.float(), dim=1).std(dim=0).mean()
        return loss, {"z_std": std}

    def param_groups(self) -> list[dict]:
        encoder = [p for n, p in self.named_parameters() if not n.startswith("predictor.")]
        return [{"params": encoder}, {"params": list(self.predictor.parameters()), "fix_lr": self.fix_pred_lr}]

