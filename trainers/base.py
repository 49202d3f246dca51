"""What every method shares: the `Method` interface the engine drives, momentum (EMA) updates and the
distributed helpers (all-gather without gradient, shuffle-BN)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from viewpipe.trainers.models import Backbone


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order (no gradient); `x` itself on a single process."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target ← m·target + (1−m)·online, parameters only (buffers such as BN statistics are the target's own)."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)


class Method(nn.Module):
    """A self-supervised method: an online `backbone` (whose last stage the ContrastiveCrop box pass reads and
    whose pooled features the kNN monitor uses), `forward(views, batch)` returning (loss, logs), and hooks the
    engine calls. Queues and banks are buffers, so `state_dict()` checkpoints them."""

    backbone: Backbone

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """After each optimizer step; `progress` ∈ [0, 1] is the fraction of training done (momentum schedules)."""

    def set_epoch(self, epoch: int) -> None:
        """At the start of each epoch (loss-weight schedules)."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group with `fix_lr=True` keeps the base lr (SimSiam's predictor)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def needs_neighbours(self) -> int:
        """k of the neighbour table this method needs in the sample state (0: none)."""
        return 0


@torch.no_grad()
def shuffle_bn_forward(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffle-BN: the key encoder sees the global batch shuffled across ranks, so BN statistics are not
    computed from the same images as the queries' (which would leak a shortcut). A no-op on one process."""
    if not distributed():
        return encoder(x)
    world, rank = dist.get_world_size(), dist.get_rank()
    all_x = gather(x)
    perm = torch.randperm(all_x.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    local = perm.view(world, -1)[rank]
    out = gather(encoder(all_x[local]))
    return out[unshuffle].view(world, -1, *out.shape[1:])[rank]
