"""CsMl: Xu, Zhang, Li, Xie, Xiong & Tian, "Seed the Views: Hierarchical Semantic Alignment for Contrastive
Representation Learning" (arXiv:2012.02733; code: github.com/haohang96/CSML). "Cross-samples and Multi-level":
instance discrimination pushes apart two images that are in fact alike; CsMl makes each image's nearest
neighbours in the dataset extra positives of MoCo v2, pulled together at several stages of the network.

Neighbours: every `interval` epochs (default 5, from epoch 0) the momentum encoder's pooled backbone features
(before the head, L2-normalised) of the whole training set on clean images (ImageNet: resize 256, centre crop
224) give an exact cosine k-NN table (default k = 5; the sample itself dropped by index), published in the
shared SampleState by a state updater (`NeighbourMiner`, `trainers/updaters.py`). The loaders then deliver,
with each sample's two views, two views of one of its k neighbours picked at random (`companions=True`:
views[:2] anchor x_q, x_k; views[2:] neighbour x'_q, x'_k).

Loss: a CutMix of x_q with x'_q is a third query (one box per batch of side √(1−λ₀) of the image, λ₀ ~
Beta(2, 2), centre uniform, clipped at the borders; λ = 1 − pasted area / image area). Per level, with the
MoCo queue Q of anchor keys, τ its temperature and

    ℓ(v, u) = −log( e^{v·u/τ} / (e^{v·u/τ} + Σ_{n∈Q} e^{v·n/τ}) )

    L = ⅓ [a·ℓ(q,k) + b·ℓ(q,k′) + a·ℓ(q′,k′) + b·ℓ(q′,k) + λ·ℓ(q_mix,k) + (1−λ)·ℓ(q_mix,k′)]

each positive its own InfoNCE term (the other positive is not in its denominator), with (a, b) = (1, 0) up to
and including epoch `switch_epoch` (epochs from 0) and (0.5, 0.5) after it: the release's `main_moco.py`,
`for epoch in range(start_epoch, FLAGS.end_epoch)` with `start_epoch = 0` and `soft_lam[j] = FLAGS.lam[0] if
epoch > 10 else 1`, i.e. 11 epochs at (1, 0) before the switch; only the anchor's keys k enter the queue.

Multi-level: the same loss on pooled heads of several backbone stages (default stages 3 and 4, weights 0.5 and
1), each level with its own momentum head and queue. The multi-level part is described in the paper but
absent from the authors' released code: this is viewpipe's design of it (`levels=[4]` turns it off).

Published (MoCo v2, ResNet-50, batch 256, SGD lr 0.03, cosine, 200 epochs): 76.6% linear top-1 on ImageNet;
66.7% and 75.1% top-1 with 1% and 10% of the labels.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from viewpipe.errors import ViewpipeError
from viewpipe.dist import gather_rows, rank_world
from viewpipe.sources import Source
from viewpipe.state import SampleState
from viewpipe.trainers.base import Method, momentum_update, register, shuffle_bn_forward
from viewpipe.trainers.clean import CleanOptions, dataset_outputs, eval_mode
from viewpipe.trainers.models import Backbone, mlp
from viewpipe.trainers.mocov2 import enqueue, infonce
from viewpipe.trainers.updaters import DataContext, StateUpdater

if TYPE_CHECKING:
    from viewpipe.trainers.config import TrainConfig


# ------------------------------------------------------------------------------------------------ mining
@torch.no_grad()
def cosine_knn(features: torch.Tensor, k: int, rows: torch.Tensor | None = None, row_chunk: int = 4096,
               col_chunk: int = 131072) -> torch.Tensor:
    """Exact k nearest neighbours by cosine: for each of `rows` (default all) of `features` (N, d), the indices
    (len(rows), k) of the k most similar *other* samples, most similar first. The sample itself is excluded by
    index (a duplicate image still counts as a neighbour). Blocked over rows and columns with a running top-k,
    so memory is row_chunk × col_chunk whatever N: 1.28 M × 1.28 M is a loop, not a matrix."""
    f = F.normalize(features.float(), dim=1)
    n = len(f)
    if not 0 < k < n:
        raise ViewpipeError(f"neighbour mining: k = {k} needs 0 < k < the number of samples ({n})")
    rows = torch.arange(n, device=f.device) if rows is None else rows.to(f.device, torch.long)
    out = torch.empty((len(rows), k), dtype=torch.long, device=f.device)
    for r0 in range(0, len(rows), row_chunk):
        r = rows[r0:r0 + row_chunk]
        best_s = torch.full((len(r), k), -torch.inf, device=f.device)
        best_i = torch.zeros((len(r), k), dtype=torch.long, device=f.device)
        for c0 in range(0, n, col_chunk):
            sim = f[r] @ f[c0:c0 + col_chunk].T
            own = r - c0
            inside = (own >= 0) & (own < sim.shape[1])
            sim[inside.nonzero().squeeze(1), own[inside]] = -torch.inf
            s, i = sim.topk(min(k, sim.shape[1]), dim=1)
            best_s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
            best_i = torch.cat([best_i, i + c0], 1).gather(1, j)
        out[r0:r0 + len(r)] = best_i
    return out


def mine_neighbours(backbone: Backbone, source: Source, options: CleanOptions, k: int) -> np.ndarray:
    """The (N, k) int32 neighbour table of the whole training set in dataset order, on every rank: `backbone`'s
    L2-normalised pooled features of clean images (`options`: options.size², or with `options.resize` the
    shorter side to it and the centre crop, ImageNet's 256/224), then `cosine_knn`. Under torch.distributed
    each rank runs the clean pass and the k-NN rows of its strided share; both are gathered back into dataset
    order."""
    with eval_mode(backbone):
        feats = dataset_outputs(lambda x: F.normalize(backbone.pooled(x).float(), dim=1), source, options,
                                desc="neighbour features")
    rank, world = rank_world()
    n = len(feats)
    table = gather_rows(cosine_knn(feats, k, torch.arange(rank, n, world)), n, options.device)
    return table.cpu().numpy().astype(np.int32)


class NeighbourMiner(StateUpdater):
    """CsMl's neighbour mining as a state updater: before every epoch e with e % interval == 0 (from epoch 0),
    the momentum encoder's neighbour table (`mine_neighbours`, clean images resized by `resize`), published as
    the sample state's neighbours. Logs how often a neighbour has its anchor's label (a quality signal: chance
    is 1 / classes)."""

    name = "nn"
    before_epoch = True

    def __init__(self, k: int, interval: int, resize: int = 0) -> None:
        super().__init__()
        self.k, self.interval, self.resize = k, interval, resize

    def due(self, epoch: int) -> bool:
        return epoch % self.interval == 0

    def compute(self, method: Method, data: DataContext, epoch: int) -> np.ndarray:
        return mine_neighbours(method.key.backbone, data.source, replace(data.clean, resize=self.resize), self.k)

    def publish(self, state: SampleState, result: np.ndarray, epoch: int) -> None:
        state.set_neighbours(result)

    def report(self, result: np.ndarray, data: DataContext, epoch: int) -> dict[str, Any]:
        from viewpipe.sources import is_labelled

        if not is_labelled(data.source):  # unlabelled data: agreement of -1 with -1 would read 1.0
            return {}
        labels = np.asarray(data.source.labels)
        return {"nn_label_agreement": float(np.mean(labels[result] == labels[:, None]))}


# ------------------------------------------------------------------------------------------------ views and loss
def cutmix(a: torch.Tensor, b: torch.Tensor, lam0: float) -> tuple[torch.Tensor, float]:
    """`a` with one box of `b` pasted (the same box for the whole batch): side √(1−λ₀) of the image, centre
    uniform, clipped at the borders (CutMix). Returns the mix and λ = 1 − pasted area / image area."""
    H, W = a.shape[-2:]
    cut = (1.0 - lam0) ** 0.5
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    mixed = a.clone()
    mixed[..., y0:y1, x0:x1] = b[..., y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)


def csml_loss(q: torch.Tensor, q_nn: torch.Tensor, q_mix: torch.Tensor, k: torch.Tensor, k_nn: torch.Tensor,
              queue: torch.Tensor, tau: float, a: float, b: float, lam: float) -> torch.Tensor:
    """One level's loss (the module's docstring): ⅓ [a·ℓ(q,k) + b·ℓ(q,k′) + a·ℓ(q′,k′) + b·ℓ(q′,k) +
    λ·ℓ(q_mix,k) + (1−λ)·ℓ(q_mix,k′)], each ℓ its own InfoNCE against `queue` (dim, K): the other positive is
    not in its denominator. Terms with weight 0 are skipped."""
    terms = [(a, q, k), (b, q, k_nn), (a, q_nn, k_nn), (b, q_nn, k), (lam, q_mix, k), (1 - lam, q_mix, k_nn)]
    return sum(w * infonce(x, y, queue, tau) for w, x, y in terms if w) / 3


class LevelEncoder(nn.Module):
    """Backbone → the chosen stages (1-based: 4 is the last), each average-pooled → its own MLP head →
    L2-normalised: (B, levels, dim)."""

    def __init__(self, backbone: Backbone, levels: tuple[int, ...], dim: int, hidden: int) -> None:
        super().__init__()
        self.backbone, self.levels = backbone, levels
        self.heads = nn.ModuleList(mlp([backbone.dims[s - 1], hidden or backbone.dims[s - 1], dim], hidden_bn=False)
                                   for s in levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.stages(x)
        return torch.stack([F.normalize(head(maps[s - 1].mean(dim=(2, 3))), dim=1)
                            for s, head in zip(self.levels, self.heads)], dim=1)


@register("csml")
class CsMl(Method):
    """CsMl on MoCo v2. Defaults: the paper's MoCo v2 recipe (head → 128 with hidden = each level's width,
    queue 65,536, m 0.999, τ 0.2), k = 5 neighbours mined every 5 epochs from epoch 0, (a, b) = (1, 0) then
    (0.5, 0.5) after epoch 10 (epochs from 0, as the release), CutMix λ₀ ~ Beta(2, 2), levels: stages 3 and 4 weighted 0.5 and 1.
    `mine_resize`: the clean pass's resize before the centre crop (256 on ImageNet; 0: resize to data.size)."""

    views = (2, 2)  # 2 of the sample and 2 of its neighbour (the loader's companions)

    def __init__(self, backbone: Backbone, dim: int = 128, hidden: int = 0, queue: int = 65536,
                 momentum: float = 0.999, tau: float = 0.2, k: int = 5, interval: int = 5, switch_epoch: int = 10,
                 weights: tuple[float, float] = (1.0, 0.0), late_weights: tuple[float, float] = (0.5, 0.5),
                 cutmix_beta: float = 2.0, levels: tuple[int, ...] = (3, 4),
                 level_weights: tuple[float, ...] = (0.5, 1.0), mine_resize: int = 0, shuffle_bn: bool = True) -> None:
        """Args:
            dim: width of each level's embedding.
            hidden: width of each head's hidden layer (0: that level's width).
            queue: keys in the FIFO queue of negatives (one queue per level).
            momentum: m of the key encoder's EMA.
            tau: temperature τ of InfoNCE.
            k: neighbours per sample mined into the sample state (the companion is drawn among them).
            interval: epochs between neighbour minings (mined before epoch 0 and every `interval` epochs).
            switch_epoch: the loss weights change to `late_weights` after this epoch (epochs from 0).
            weights: (a, b) of the loss up to switch_epoch: a weighs each view's own positive, b its neighbour's.
            late_weights: (a, b) after switch_epoch.
            cutmix_beta: β of the CutMix ratio λ₀ ~ Beta(β, β) that mixes a view with its neighbour's.
            levels: the backbone's stages (1-based, the last is 4 on a ResNet) that get a head and a loss.
            level_weights: one loss weight per level.
            mine_resize: the mining pass's resize before the centre crop (0: resize to data.size).
            shuffle_bn: shuffle the keys' batch across ranks for BatchNorm (MoCo's shuffle-BN).
        """
        super().__init__()
        levels, level_weights = tuple(int(s) for s in levels), tuple(float(w) for w in level_weights)
        if not levels or any(not 1 <= s <= len(backbone.dims) for s in levels):
            raise ViewpipeError(f"csml levels {list(levels)}: stages are numbered 1 to {len(backbone.dims)}")
        if len(level_weights) != len(levels):
            raise ViewpipeError(f"csml level_weights {list(level_weights)}: give one weight per level {list(levels)}")
        if k < 1 or interval < 1:
            raise ViewpipeError(f"csml k = {k} and interval = {interval} must be at least 1")
        self.backbone = backbone
        self.query = LevelEncoder(backbone, levels, dim, hidden)
        self.key = copy.deepcopy(self.query)
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.levels, self.level_weights = levels, level_weights
        self.momentum, self.tau, self.k, self.interval, self.shuffle_bn = momentum, tau, k, interval, shuffle_bn
        self.switch_epoch, self.early, self.late = switch_epoch, tuple(weights), tuple(late_weights)
        self.ab = self.early
        self.beta = torch.distributions.Beta(float(cutmix_beta), float(cutmix_beta))
        self.mine_resize = mine_resize
        self.register_buffer("queue", F.normalize(torch.randn(len(levels), dim, queue), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def needs_neighbours(self) -> int:
        return self.k

    def set_epoch(self, epoch: int) -> None:
        """The loss weights of `epoch` (from 0): the late ones once epoch > switch_epoch, as the release."""
        self.ab = self.late if epoch > self.switch_epoch else self.early

    def updaters(self, cfg: TrainConfig) -> list[StateUpdater]:
        return [NeighbourMiner(self.k, self.interval, self.mine_resize)]

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle_bn_forward(self.key, x) if self.shuffle_bn else self.key(x)

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(views) != 4:
            raise ViewpipeError(f"csml needs 2 views of each sample and 2 of its neighbour (data.views=2 with "
                                f"companions), got {len(views)} views")
        x_q, x_k, n_q, n_k = views
        mixed, lam = cutmix(x_q, n_q, float(self.beta.sample()))
        q, q_nn, q_mix = self.query(x_q), self.query(n_q), self.query(mixed)
        k, k_nn = self._keys(x_k), self._keys(n_k)
        queue = self.queue.clone().detach()
        a, b = self.ab
        logs: dict[str, torch.Tensor] = {"lam": torch.tensor(lam)}
        loss = torch.zeros((), device=q.device)
        for lvl, (stage, w) in enumerate(zip(self.levels, self.level_weights)):
            part = csml_loss(q[:, lvl], q_nn[:, lvl], q_mix[:, lvl], k[:, lvl], k_nn[:, lvl], queue[lvl], self.tau,
                             a, b, lam)
            logs[f"loss_stage{stage}"] = part.detach()
            loss = loss + w * part
        enqueue(self.queue, self.queue_ptr, k)  # only the anchor's keys
        return loss, logs

    def after_step(self, progress: float) -> None:
        momentum_update(self.query, self.key, self.momentum)
