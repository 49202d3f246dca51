"""torch.distributed in one place: the process group's set-up, this process's rank, world size and local rank,
and the collectives the rest of viewpipe uses (barrier, broadcast, gathers in rank order and in dataset
order). Every function is also right on a single process, where the collectives are no-ops or return the
local value, so callers never ask "is torch.distributed on?" themselves.

Whole-dataset passes (ContrastiveCrop's boxes, CsMl's neighbours, the kNN monitor) split the dataset into
strided shares: rank r of `world` takes samples r, r + world, r + 2·world, …; `gather_rows` puts every rank's
rows back into dataset order on every rank.

Several nodes: `setup` gathers every rank's `peer_record` (its node, host, pid) once. A node is what shares
/dev/shm (the per-sample state's segments): the machine (hostname, boot id), the shared-memory mount and
torchrun's node rank (GROUP_RANK), so two torchrun agents on one machine are two nodes with a state each;
`node_leaders` maps each rank to its node's lowest rank, whatever the rank layout. Collectives time out after
`setup`'s `timeout_s`; when a peer dies, `peer_failure` tells a collective's error apart and `lost_rank`
names the rank that is gone, as far as this process can know.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from viewpipe.errors import ViewpipeError


_owned = False  # whether `setup` initialised the process group (and `teardown` should destroy it)
_peers: list[dict] = []  # every rank's `peer_record`, in rank order, gathered by `setup`


def is_on() -> bool:
    """Whether torch.distributed is initialised in this process (even with a world of one)."""
    return dist.is_available() and dist.is_initialized()


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world): the arguments where given, else torch.distributed's when it is initialised, else (0, 1)."""
    on = is_on()
    rank = rank if rank is not None else (dist.get_rank() if on else 0)
    world = world if world is not None else (dist.get_world_size() if on else 1)
    if not 0 <= rank < world:
        raise ViewpipeError(f"rank {rank} is outside world size {world}")
    return rank, world


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 on a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def several() -> bool:
    """Whether more than one process takes part (torch.distributed on, world size > 1)."""
    return is_on() and dist.get_world_size() > 1


def setup(device: str, timeout_s: float | None = None) -> tuple[torch.device, int, int, int]:
    """(device, rank, world, local rank) of this process for `device` ("auto", "cuda" or "cpu"). Under torchrun
    (WORLD_SIZE > 1) the process group is initialised here: NCCL on the GPU, gloo on the CPU; each process
    uses the GPU of its local rank. `timeout_s`: how long a collective waits for the other ranks before it
    raises (gloo) or the watchdog aborts the process (NCCL); None: torch's default. Every rank's
    `peer_record` is gathered (`peers`)."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ViewpipeError("device=cuda but torch sees no GPU; use device=auto or cpu")
    global _owned
    local = local_rank()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_on():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timeout)
        _owned = True
    rank, world = rank_world()
    global _peers
    _peers = gather_objects(peer_record())
    if want_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world, local
    return torch.device("cpu"), rank, world, local


def teardown(wait: bool = True) -> None:
    """Destroy the process group if `setup` created it; with `wait` after a barrier, so that no rank leaves
    while another still talks to it (after an error, without: the other ranks may never reach it). Left to
    interpreter exit, gloo's worker threads can abort the process ("terminate called without an active
    exception"). A group the caller initialised itself is left alone."""
    global _owned
    if _owned and is_on():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _owned = False


# ---------------------------------------------------------------------------------------------- nodes and peers
def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def node_key() -> str:
    """What identifies this process's node, the processes that share its /dev/shm: hostname, boot id, the
    shared-memory folder's device and inode, and torchrun's node rank (GROUP_RANK; two agents on one machine
    are two nodes)."""
    from viewpipe.segments import SHM_DIR

    try:
        st = os.stat(SHM_DIR)
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = str(SHM_DIR)
    return "/".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), shm,
                     os.environ.get("GROUP_RANK", "")))


def _start(pid: int) -> int:
    """Start time of a running process in clock ticks since boot; -1 when it is gone (or a zombie)."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)
    if len(fields) < 2 or fields[1].split()[0] in ("Z", "X"):
        return -1
    return int(fields[1].split()[19])


def peer_record() -> dict:
    """This process as the other ranks see it: its node (`node_key`), host, node rank, pid and start time."""
    pid = os.getpid()
    return {"node": node_key(), "host": socket.gethostname(), "node_rank": os.environ.get("GROUP_RANK", ""),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "pid": pid, "start": _start(pid)}


def peers() -> list[dict]:
    """Every rank's `peer_record` in rank order, as `setup` gathered them (this process's alone before)."""
    return _peers or [peer_record()]


def node_leaders(nodes: list[str]) -> list[int]:
    """For each rank (its node key at its index), the lowest rank on the same node: the one that creates and
    writes the node's shared state. Independent of how ranks are laid out over the nodes."""
    first: dict[str, int] = {}
    for r, node in enumerate(nodes):
        first.setdefault(node, r)
    return [first[node] for node in nodes]


_PEER_ERRORS = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
                "gloo", "nccl", "c10d", "processgroup")


def peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective's failure (a peer gone or not answering within the timeout) in a
    process of a distributed run (a ViewpipeError never is)."""
    from viewpipe.errors import ViewpipeError

    if len(_peers) < 2 or isinstance(exc, (ViewpipeError, KeyboardInterrupt)):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(k in str(exc).lower() for k in _PEER_ERRORS)


def lost_rank(exc: BaseException, rank: int) -> str:
    """Which rank is gone, as far as rank `rank` can know after `exc`: those on this machine whose process has
    ended (pid checked); else, of the ranks on other machines, those of the host the error names (by name or
    address), else all of them; else (every rank here, alive: one stopped, not answering) all the others.
    With the error's first line."""
    me = peers()[rank] if rank < len(peers()) else peer_record()
    here = [r for r, p in enumerate(peers()) if r != rank and (p["host"], p["boot"]) == (me["host"], me["boot"])]
    gone = [r for r in here if _start(peers()[r]["pid"]) != peers()[r]["start"]]
    others = [r for r in range(len(peers())) if r != rank]
    remote = [r for r in others if r not in here]
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.cc:\d+\] ", "", text).split(". ", 1)[0][:200]  # (gloo's source location, advice)
    if not gone:
        gone = [r for r in remote if _names(text, r)] or remote or others
    ranks = ", ".join(f"rank {r} (pid {peers()[r]['pid']} on {peers()[r]['host']}"
                      f"{', node ' + peers()[r]['node_rank'] if peers()[r]['node_rank'] else ''})" for r in gone)
    ranks = ranks if len(gone) == 1 else f"one of {ranks}"
    return f"lost {ranks}: {text}"


def _names(text: str, r: int) -> bool:
    """Whether the error text names rank r's host (by name or by one of its addresses)."""
    host = peers()[r]["host"]
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        addrs = set()
    return host in text or any(f"[{a}]" in text for a in addrs)


# ---------------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    """Wait for every rank (nothing to wait for on a single process)."""
    if is_on():
        dist.barrier()


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`tensor` overwritten in place with rank `src`'s (unchanged on a single process); returns it."""
    if is_on():
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` replaced in place by its element-wise minimum over the ranks; returns it."""
    if several():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` on a single process)."""
    if not is_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather_ranks(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (the same shape on every rank) concatenated along dim 0 in rank order, without
    gradient; `x` itself on a single process."""
    if not several():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_rows(local: torch.Tensor | None, n: int, device: torch.device | str, rank: int | None = None,
                world: int | None = None) -> torch.Tensor:
    """The full (n, ...) result in dataset order from every rank's strided share (rows r::world of rank r),
    on every rank, on `device`. Shares differ by one row at most, so each is padded to ceil(n / world) for
    `all_gather`. `local` is None (or empty) on a rank whose share is empty; the row shape and dtype come from
    the ranks that have one. On a single process (or `world` 1) it is `local` itself. rank/world default to
    torch.distributed's; `world` > 1 needs it initialised, every rank calling."""
    rank, world = rank_world(rank, world)
    if world == 1:
        if local is None:
            raise ViewpipeError(f"gather_rows: no rows for the {n} samples")
        return local.to(device)
    if not is_on():
        raise ViewpipeError(f"gather_rows: world size {world} without torch.distributed initialised; call it "
                            "from every rank after init_process_group")
    if local is not None and not len(local):
        local = None
    meta = None if local is None else (tuple(local.shape[1:]), str(local.dtype).removeprefix("torch."))
    known = [m for m in gather_objects(meta) if m is not None]
    if not known:
        raise ViewpipeError("gather_rows: the dataset is empty on every rank")
    if any(m != known[0] for m in known):
        raise ViewpipeError(f"gather_rows: ranks returned different row shapes or dtypes: {known}")
    shape, dtype = known[0][0], getattr(torch, known[0][1])
    wire_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")  # gloo: host
    wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool all_gather
    per = -(-n // world)
    padded = torch.zeros((per, *shape), dtype=wire, device=wire_device)
    if local is not None:
        padded[: len(local)] = local.to(device=wire_device, dtype=wire)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n, *shape), dtype=wire, device=wire_device)
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n, world))]
    return out.to(device=device, dtype=dtype)
