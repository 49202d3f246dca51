"""What every method shares: the `Method` interface the engine drives, the method registry (`register`,
`build_method`, which makes every rank start from rank 0's weights, queues and banks), momentum (EMA) updates,
MoCo's shuffle-BN and the broadcast of BatchNorm statistics (collectives from `viewpipe.dist`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn as nn

from viewpipe.dist import broadcast, gather_ranks, rank_world, several
from viewpipe.errors import ViewpipeError
from viewpipe.trainers.models import Backbone, build_backbone
from viewpipe.trainers.updaters import StateUpdater

if TYPE_CHECKING:
    from viewpipe.trainers.config import TrainConfig


@torch.no_grad()
def broadcast_bn_stats(module: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics. The engine's DDP does not broadcast buffers each
    step (the queues start identical, `broadcast_state`, and stay so: every rank enqueues all ranks' keys), so
    each rank's running statistics drift apart; the eval-mode passes over the whole dataset (boxes, neighbours,
    kNN) must all see one network."""
    if not several():
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    broadcast(buf, src=0)


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Overwrite every parameter and buffer of `module` (weights, momentum encoders, queues, banks, their
    pointers, BN statistics) with rank 0's, so that ranks seeded differently start identical. DDP would sync the
    parameters but not the buffers (the engine turns its buffer broadcast off). A no-op on one process; with
    NCCL, CPU tensors travel through the current GPU."""
    if not several():
        return
    import torch.distributed as dist

    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for t in [*module.parameters(), *module.buffers()]:
        t = t.detach()
        if wire is None or t.device == wire:
            broadcast(t, src=0)
        else:
            t.copy_(broadcast(t.to(wire), src=0))


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
    views: tuple[int, int | None] = (2, None)  # views of each sample `forward` takes: (at least, at most)

    def forward(self, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """After each optimizer step; `progress` ∈ [0, 1] is the fraction of training done (momentum schedules)."""

    def set_epoch(self, epoch: int) -> None:
        """At the start of each epoch (loss-weight schedules)."""

    def updaters(self, cfg: TrainConfig) -> list[StateUpdater]:
        """The method's own state updaters (`trainers/updaters.py`), which the engine runs on their schedules
        (CsMl: its neighbour miner). ContrastiveCrop's box updater is not a method's: the engine builds it from
        `cfg.ccrop` for any method (`engine.state_updaters`)."""
        return []

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group with `fix_lr=True` keeps the base lr (SimSiam's predictor)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def needs_neighbours(self) -> int:
        """k of the neighbour table this method needs in the sample state (0: none)."""
        return 0


# ---------------------------------------------------------------------------------------------- the registry
METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(name: str) -> Callable[[M], M]:
    """Class decorator of a method module: `@register("mocov2")` on `class MoCoV2(Method)` makes it the
    config's `method: mocov2`. The package's `__init__` imports every method module, so the registry is full
    whenever anything of `viewpipe.trainers` is imported."""

    def add(cls: M) -> M:
        if METHODS.setdefault(name, cls) is not cls:
            raise ValueError(f"method {name!r} registered twice: {METHODS[name].__qualname__}, {cls.__qualname__}")
        return cls

    return add


def build_method(cfg: TrainConfig) -> Method:
    """The registered method `cfg.method` on a fresh `cfg.backbone` built with `cfg.backbone_args`, with
    `cfg.method_args`; under torch.distributed every rank holds rank 0's weights and buffers (`broadcast_state`)."""
    if cfg.method not in METHODS:
        raise ViewpipeError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
    if not isinstance(cfg.backbone_args, dict):
        raise ViewpipeError(f"backbone_args: expected a mapping, got {cfg.backbone_args!r}")
    try:
        backbone = build_backbone(cfg.backbone, **cfg.backbone_args)
    except TypeError as exc:
        raise ViewpipeError(f"backbone_args for {cfg.backbone}: {exc}") from None
    try:
        method = METHODS[cfg.method](backbone, **cfg.method_args)
    except TypeError as exc:
        raise ViewpipeError(f"method_args for {cfg.method}: {exc}") from None
    broadcast_state(method)
    return method


@torch.no_grad()
def shuffle_bn_forward(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffle-BN: the key encoder sees the global batch shuffled across ranks, so BN statistics are not
    computed from the same images as the queries' (which would leak a shortcut). A no-op on one process."""
    if not several():
        return encoder(x)
    rank, world = rank_world()
    all_x = gather_ranks(x)
    perm = broadcast(torch.randperm(all_x.shape[0], device=x.device), src=0)
    unshuffle = torch.argsort(perm)
    local = perm.view(world, -1)[rank]
    out = gather_ranks(encoder(all_x[local]))
    return out[unshuffle].view(world, -1, *out.shape[1:])[rank]
