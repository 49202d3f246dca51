"""SimCLR: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709).

One encoder (backbone → projection MLP g → L2-normalised z) embeds both views of each of the N images of the
batch; NT-Xent (the normalised temperature-scaled cross entropy) asks each of the 2N embeddings to pick the
other view of its image among the 2N − 1 others:

    ℓ(i, j) = −log( exp(zᵢ·zⱼ/τ) / Σ_{k ≠ i} exp(zᵢ·z_k/τ) ),    L = (1/2N) Σ over the 2N anchors of ℓ(i, j(i))

No queue and no momentum encoder: the negatives are the batch's other images, all ranks' (the embeddings are
gathered with their gradients, as SimCLR's cross-replica concatenation, the release's `diffdist` gather and
solo-learn's `GatherLayer`), so the loss is that of the global batch of N = G·B images, each rank averaging over
its own 2B anchors and DDP averaging over the ranks. Both views go through the encoder as one batch of 2B (the
release's `DDP_simclr_ccrop.py:148, 155` and the original code), so BN statistics mix the views. Two views of each
sample, no multi-crop (`views = (2, 2)`).

ContrastiveCrop's SimCLR host on small datasets (`DDP_simclr_ccrop.py`, `losses/NT_Xent_dist.py`): a
512-512-128 head (Linear-ReLU-Linear), τ 0.5, and the loss multiplied by τ / base_τ with base_τ 0.07 (the
SupContrast code it adapts): `base_tau` here, 0 for the paper's unscaled loss. ImageNet (the paper's default
setting, §2.3, and the official README's command): 2048-2048-128 head with BN (`head_bn`, the original code's
head), τ 0.1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from viewpipe.dist import rank_world, several
from viewpipe.errors import ViewpipeError
from viewpipe.trainers.base import Method, register
from viewpipe.trainers.models import Backbone, mlp


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' `x` in rank order; backward sums every rank's gradient of the gathered tensor and returns this
    rank's rows (so each embedding gets the gradient of every rank's loss terms it enters)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, world = rank_world()
        return grad.view(world, -1, *grad.shape[1:])[rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (the same shape on every rank) concatenated along dim 0 in rank order, differentiable
    (`_GatherWithGrad`); `x` itself on a single process."""
    return _GatherWithGrad.apply(x) if several() else x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float, base_tau: float = 0.0) -> torch.Tensor:
    """NT-Xent of this rank's 2B anchors (z1, z2: (B, d), L2-normalised, row i the two views of image i) over
    all ranks' 2·G·B embeddings: each anchor's positive is its image's other view, every other embedding but
    itself is a negative; cross entropy averaged over the anchors, × τ / base_τ when base_τ > 0."""
    B = len(z1)
    rank, world = rank_world()
    cand = torch.cat([gather_with_grad(z1), gather_with_grad(z2)]).float()  # (2·G·B, d): all views 1, all views 2
    anchors = torch.cat([z1, z2]).float()
    logits = anchors @ cand.T / tau
    own = rank * B + torch.arange(B, device=z1.device)
    self_idx = torch.cat([own, world * B + own])  # where each anchor itself sits among the candidates
    pos_idx = torch.cat([world * B + own, own])  # its other view
    logits[torch.arange(2 * B, device=z1.device), self_idx] = -torch.inf
    loss = F.cross_entropy(logits, pos_idx)
    return loss * (tau / base_tau) if base_tau > 0 else loss


@register("simclr")
class SimCLR(Method):
    """SimCLR. Defaults: the small-dataset ContrastiveCrop recipe's head and temperature (head backbone.dim →
    hidden → dim, Linear-ReLU-Linear; hidden 0 means backbone.dim; dim 128; τ 0.5) with the paper's unscaled
    loss (`base_tau` 0; the release's 0.07 multiplies it by τ / 0.07). `head_bn` puts BN after both head
    layers (the original code's head; then no biases). ImageNet: dim 128, hidden 2048, τ 0.1, head_bn."""

    views = (2, 2)

    def __init__(self, backbone: Backbone, dim: int = 128, hidden: int = 0, tau: float = 0.5,
                 base_tau: float = 0.0, head_bn: bool = False) -> None:
        """Args:
            dim: width of the embedding z (the head's output).
            hidden: width of the head's hidden layer (0: the backbone's width).
            tau: temperature τ of NT-Xent.
            base_tau: multiply the loss by τ / base_tau, as the ContrastiveCrop release (0: the paper's loss).
            head_bn: BatchNorm after both head layers (the original code's head), without biases.
        """
        super().__init__()
        if base_tau < 0:
            raise ViewpipeError(f"simclr base_tau = {base_tau}: expected 0 (no scaling) or a positive temperature")
        hidden = hidden or backbone.dim
        self.backbone = backbone
        self.head = mlp([backbone.dim, hidden, dim], hidden_bn=head_bn, last_bn=head_bn)
        self.tau, self.base_tau = tau, base_tau

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised projection z of a batch of images."""
        return F.normalize(self.head(self.backbone.pooled(x)), dim=1)

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.embed(torch.cat([views[0], views[1]])).chunk(2)  # one forward: BN sees both views
        return nt_xent(z1, z2, self.tau, self.base_tau), {}
