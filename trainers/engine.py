"""The training loop every method runs on: loaders from any backend over the live SampleState, the epoch
loop with AMP (bf16 on the GPU), channels_last, DDP (torchrun; NCCL on the GPU, gloo on the CPU; set up by
`viewpipe.dist`), SyncBN, logging (console, progress bar, JSONL) with throughput and the time spent waiting for
data, the method's state updaters at the epoch boundaries (`trainers/updaters.py`) and the kNN monitor, and exact
resume of everything (model, optimizer, queues, sample state, RNG states, epoch and batch within it) from
checksummed checkpoints (`trainers/checkpoint.py`: the last two kept, a damaged one refused). The optimizer and
the lr schedule are `trainers/optim.py`'s, the method comes from the registry (`trainers/base.py`). A non-finite
loss stops the run (or, with `optim.skip_nonfinite`, its step is skipped) and a non-finite state is never
saved."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from viewpipe.dist import (all_reduce_min, barrier, gather_objects, gather_ranks, lost_rank, node_leaders, peer_failure,
                           peers, setup, teardown)
from viewpipe.errors import ViewpipeError
from viewpipe.pipelines import Batch, DaliOptions, LoaderConfig, get_backend
from viewpipe.sources import open_source
from viewpipe.state import SampleState
from viewpipe.trainers.base import build_method, broadcast_bn_stats
from viewpipe.trainers.ccrop import BoxUpdater
from viewpipe.trainers.checkpoint import (load_checkpoint, previous_path, remove_stale_tmp, rng_state, run_files,
                                          save_checkpoint, seed_all, set_rng_state, trim_log, warn)
from viewpipe.trainers.clean import CleanOptions
from viewpipe.trainers.config import (TrainConfig, build_augment, build_crop, build_groups, effective_workers,
                                      save_config, to_dict, validate, workers_line)
from viewpipe.trainers.loggers import Logger, check_available, numeric, open_loggers, read_png
from viewpipe.trainers.optim import build_optimizer, lr_at, set_lr
from viewpipe.trainers.updaters import DataContext, StateUpdater

# what a resume reads from a checkpoint (a file without them is not one of viewpipe pretrain's)
REQUIRED = ("config", "epoch", "step", "loader", "model", "optimizer", "sample_state", "box_updates", "history",
            "rng")
NO_BAD_STEP = 2**62  # "no non-finite loss yet" in the device-side record of the first one


def state_updaters(cfg: TrainConfig, method: Any) -> tuple[BoxUpdater | None, list[StateUpdater]]:
    """The run's state updaters: ContrastiveCrop's box updater, built from `cfg.ccrop` when it is enabled
    (None otherwise), first, then the method's own (`Method.updaters`)."""
    boxes = BoxUpdater(cfg.ccrop, cfg.epochs) if cfg.ccrop.enabled else None
    return boxes, [*([boxes] if boxes is not None else []), *method.updaters(cfg)]


@dataclass
class _EpochRun:
    """One epoch as `fit` runs it: its loader, first batch and count, the updaters' fields from before it,
    the next batch `b`, and its meters (data wait and busy time, images since the last log point, the loss sum
    for the epoch's mean, the steps skipped for a non-finite loss)."""

    epoch: int
    loader: Any
    start: int
    steps: int
    before: dict
    b: int = 0
    wait: float = 0.0
    busy: float = 0.0
    images: int = 0
    loss_sum: Any = None  # a device scalar (no host sync per step)
    loss_n: int = 0
    skipped: int = 0
    t_prev: float = field(default_factory=time.perf_counter)

    def timed(self, t_data: float, images: int) -> None:
        """A step done: the time since the last one split into waiting for data and the step itself."""
        now = time.perf_counter()
        self.wait, self.busy, self.t_prev = self.wait + (t_data - self.t_prev), self.busy + (now - t_data), now
        self.images += images


class NonFiniteError(ViewpipeError):
    """A non-finite loss (or weights) stopped the run; the last good checkpoint is left as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during `fit`: the message says where the run stopped and what a resume starts from;
    `resume` is the --resume value that continues it ("auto", or a checkpoint outside the run folder) and
    `main` whether this process is rank 0 (the one that tells the user)."""

    def __init__(self, message: str, resume: str, main: bool = True) -> None:
        super().__init__(message)
        self.resume, self.main = resume, main


class Trainer:
    """One pretraining run of `cfg` in this process (one rank under torchrun). `fit()` trains from the start or
    from `resume` (a checkpoint path; "auto": `out/last.pt` when it or `out/last.prev.pt` exists) and returns the
    final metrics. The config is validated and the checkpoint verified (or replaced by the previous one kept
    beside it, with a warning) before anything is built."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        self.cfg = validate(cfg)
        check_available(cfg.logger)  # (every rank: a missing package stops them all, before anything is built)
        if not cfg.data.path:
            raise ViewpipeError("data.path is empty: give the training data (data.path=... or a config file)")
        self.device, self.rank, self.world, self.local_rank = setup(cfg.device, cfg.dist_timeout_s)
        self.main = self.rank == 0
        # the lowest rank of this process's node (what shares its /dev/shm) creates and writes the node's state
        self.leader = node_leaders([p["node"] for p in peers()])[self.rank] if self.world > 1 else 0
        self.writer = self.leader == self.rank
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "last.pt"
        self._prepare_run_folder(resume)
        seed_all(cfg.seed + self.rank)
        self._open_data(cfg)
        self._start_records()
        resume = self._resume_path(resume)
        ckpt = self._read(Path(resume)) if resume else None  # verified before anything is built; applied below
        self.augment = build_augment(cfg.data)  # (data.preset and data.augment; groups may have their own)
        self._build_model(cfg)
        self.state = self._sample_state()
        d = cfg.data  # every pass over the whole dataset (box updates, mining, the kNN monitor) reads it this way:
        self.clean = CleanOptions(size=d.size, batch_size=d.batch_size // self.world,  # through the run's backend
                                  workers=effective_workers(d.workers), mean=tuple(self.augment.mean),
                                  std=tuple(self.augment.std), split=d.split, device=self.device, backend=d.backend,
                                  amp=self.device.type == "cuda" and cfg.amp, channels_last=cfg.channels_last)
        self.data = DataContext(self.source, self.state, self.clean, writer=self.writer, main=self.main,
                                out=self.out)
        self.boxes, self.updaters = state_updaters(cfg, self.method)
        self.epoch, self.step, self.history = 0, 0, []
        self._loader, self._loader_box = None, None
        self._resume_loader: dict | None = None
        self._log = None
        if ckpt is not None:
            try:
                self._apply(ckpt)
            except BaseException:
                self.close()
                raise
        self._open_log(resume, ckpt)

    def _prepare_run_folder(self, resume: str | None) -> None:
        """The run folder checked (`_check_run_folder`), then on rank 0 made, with the resolved config saved
        (`viewpipe pretrain --config OUT/config.yaml` reruns it) and a save's leftover removed."""
        self._check_run_folder(resume)  # (before anything is written into it)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out)
            remove_stale_tmp(self.ckpt_path)  # left by a process killed during a save

    def _open_data(self, cfg: TrainConfig) -> None:
        """The training source, the kNN monitor's test set (labelled and distinct, checked before training) and
        the batch size checked against both the ranks and the data."""
        d = cfg.data
        self.source = open_source(d.path, d.split)
        if d.test_path and cfg.knn_every:
            from viewpipe.trainers.eval import check_knn_sets

            self._knn_test = check_knn_sets(self.source, d.test_path, d.split, d.test_split)[1]
        self.n = len(self.source)
        if d.batch_size % self.world:
            raise ViewpipeError(f"data.batch_size {d.batch_size} is not divisible by the {self.world} ranks")
        if d.batch_size > self.n:
            raise ViewpipeError(f"data.batch_size {d.batch_size} is larger than the {self.n} training images of "
                                f"{d.path}: not one full batch per epoch; lower data.batch_size")

    def _start_records(self) -> None:
        """What the run keeps track of beyond the model: checkpoints written, Ctrl-C, non-finite losses."""
        # what save_checkpoint knows of the file at ckpt_path: "drop" (another run's, or none), "verify", "keep"
        self._previous = "drop"
        self._good: tuple[Path, int] | None = None  # this run's last good checkpoint and its step
        self._stop_asked = False  # a first Ctrl-C: finish the step, save, stop (`_ctrl_c_finishes_the_step`)
        self._first_bad: torch.Tensor | None = None  # device-side: the first step with a non-finite loss
        self._bad_loss: torch.Tensor | None = None
        self._pos = (0, 0, 0, 0)  # (epoch, batch, batches in the epoch, steps before the epoch's batch 0)
        self.skipped_nonfinite, self._skipped_last = 0, False

    def _resume_path(self, resume: str | None) -> str | None:
        """The checkpoint to resume from: `resume`, or with "auto" `out/last.pt` when it or its previous exists."""
        if resume == "auto":
            auto = self.ckpt_path.is_file() or previous_path(self.ckpt_path).is_file()
            return str(self.ckpt_path) if auto else None
        return resume

    def _build_model(self, cfg: TrainConfig) -> None:
        """The method on the device (channels_last, SyncBN on GPUs), wrapped in DDP under torchrun, and its
        optimizer."""
        self.method = build_method(cfg).to(self.device)
        if cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.world > 1 and self.device.type == "cuda":  # (torch's SyncBN is GPU-only)
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.model: nn.Module = self.method
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():  # queues are identical on every rank: never broadcast them per step
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.model = nn.parallel.DistributedDataParallel(self.method, device_ids=ids,
                                                                 broadcast_buffers=False)
        self.optimizer = build_optimizer(cfg, self.method.param_groups())

    def _open_log(self, resume: str | None, ckpt: dict | None) -> None:
        """log.jsonl (its records after a resumed checkpoint's step dropped: those steps run again); the loggers
        (TensorBoard, W&B) open with `fit`; batch jobs (stdout not a terminal) get a line per log point instead of
        a bar."""
        if self.main and resume:
            trim_log(self.out / "log.jsonl", self.step)
        self._resumed_from = str(self._good[0]) if ckpt is not None and self._good else None
        self._log = open(self.out / "log.jsonl", "a") if self.main else None
        self._loggers: list[Logger] | None = None  # rank 0's loggers (`logger=`), opened by fit()
        self._console = self.main and not sys.stdout.isatty()

    def _check_run_folder(self, resume: str | None) -> None:
        """Refuse (one line, on every rank) to start a new run in a folder another run has used, unless resuming:
        it would append to that run's log and replace its checkpoints."""
        found = gather_objects(run_files(self.out) if self.main else None)[0]
        if found and not resume:
            raise ViewpipeError(f"{self.out} already holds a run ({', '.join(found)}): pass --resume auto to "
                                f"continue it, or choose another out=... for a new run")

    # ------------------------------------------------------------------ sample state and loader
    def _sample_state(self) -> SampleState:
        """The lowest rank of each node (`dist.node_leaders`: whatever the rank layout) creates the node's segment,
        then the node's other ranks attach to that one by name; each node's leader publishes the updates into its
        node's segment. With ContrastiveCrop it holds the K×K heatmaps (K: the backbone's last-stage side at
        ccrop.size) and their live threshold, ccrop.threshold to start with (a resume restores the checkpoint's)."""
        from viewpipe.trainers.ccrop import heatmap_side

        k, c = self.method.needs_neighbours(), self.cfg.ccrop
        state = None
        if self.writer:
            side = heatmap_side(self.method.backbone, c.size or self.cfg.data.size) if c.enabled else 0
            state = SampleState.create(self.n, neighbours=k, heatmap_size=side, threshold=c.threshold)
        if self.world == 1:
            return state
        names = gather_objects(state.name if state is not None else None)  # (after the creation)
        state = state if state is not None else SampleState.attach(names[self.leader])
        barrier()  # every rank holds its node's segment before any leader may close (and so remove) it
        return state

    def loader(self, epoch: int) -> Any:
        """The backend's loader for `epoch`: ContrastiveCrop boxes once the first update has happened, plain
        RandomResizedCrop before (the loader is rebuilt once, when that changes)."""
        use_box = self.boxes is not None and self.boxes.use_box(epoch)
        if self._loader is None or use_box != self._loader_box:
            if self._loader is not None:
                self._loader.close()
            d = self.cfg.data
            lc = LoaderConfig(views=d.views, batch_size=d.batch_size // self.world, crop=build_crop(self.cfg, use_box),
                              augment=self.augment, workers=effective_workers(d.workers), seed=self.cfg.seed,
                              channels_last=self.cfg.channels_last, groups=build_groups(d),
                              companions=self.method.needs_neighbours() > 0, device=str(self.device),
                              dali=DaliOptions(hw_decoder_load=d.hw_decoder_load, plan_ahead=d.dali_plan_ahead))
            backend = get_backend(d.backend)
            self._loader = backend(self.source, lc, self.state, rank=self.rank, world=self.world)
            self._loader_box = use_box
        return self._loader

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, loader_state: dict) -> dict:
        rng = gather_objects(rng_state())
        return {
            "config": to_dict(self.cfg), "epoch": self.epoch, "step": self.step, "loader": loader_state,
            "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sample_state": self.state.state_dict(), "box_updates": self.boxes.updates if self.boxes else 0,
            "history": self.history,
            "rng": rng,
            # what `viewpipe eval` needs
            "backbone_name": self.cfg.backbone, "backbone": self.method.backbone.state_dict(),
            "image_size": self.cfg.data.size, "mean": tuple(self.augment.mean), "std": tuple(self.augment.std),
        }

    def save(self, loader_state: dict) -> None:
        """`OUT/last.pt` (the one it replaces kept as `last.prev.pt`), unless a loss since the last check or the
        weights are not finite: then a NonFiniteError, and the last good checkpoint stays as it was."""
        self._check_finite(weights=True)  # (collective, as the checkpoint's RNG gathering)
        ckpt = self.checkpoint(loader_state)
        if self.main:
            save_checkpoint(ckpt, self.ckpt_path, previous=self._previous)
        self._previous, self._good = "keep", (self.ckpt_path, self.step)

    def _read(self, path: Path) -> dict:
        """The checkpoint to resume from: `path` verified, or the previous one kept beside it (a one-line
        warning naming both) when `path` is missing or damaged; a one-line error when neither is good."""
        if self.world == 1:
            ckpt, used, notes = load_checkpoint(path, REQUIRED)
        else:  # every rank resumes from the same checkpoint, or none does (and none waits for the others)
            try:
                ckpt, used, notes = load_checkpoint(path, REQUIRED)
                mine: tuple = ("ok", str(used), ckpt["step"])
            except ViewpipeError as exc:
                mine = ("error", str(exc), None)
            seen = gather_objects(mine)
            if mine[0] == "error":
                raise ViewpipeError(mine[1])
            failed = [f"rank {r}: {s[1]}" for r, s in enumerate(seen) if s[0] == "error"]
            if failed:
                raise ViewpipeError(failed[0])
            if len({s[1:] for s in seen}) > 1:
                raise ViewpipeError(f"the ranks found different checkpoints to resume from "
                                    f"({sorted({s[1:] for s in seen})}): give one with --resume that every rank reads")
        if self.main:
            for note in notes:
                warn(note)
        self._good = (used, int(ckpt["step"]))
        if used.resolve() == self.ckpt_path.resolve():
            self._previous = "keep"  # verified: the next save keeps it as last.prev.pt
        elif used.parent.resolve() == self.out.resolve():
            self._previous = "verify"  # e.g. last.prev.pt after a damaged last.pt: that one is moved aside
        return ckpt

    def load(self, path: Path) -> None:
        """Resume from the checkpoint at `path` (verified; see `_read`)."""
        self._apply(self._read(Path(path)))

    def _apply(self, ckpt: dict) -> None:
        try:
            self.method.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ViewpipeError(f"{self._good[0] if self._good else 'checkpoint'}: does not fit this config's "
                                f"method and backbone ({first[:160]})") from None
        if self.writer:
            self.state.load_state_dict(ckpt["sample_state"])
        if self.boxes is not None:
            self.boxes.updates = ckpt["box_updates"]
        self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        self._resume_loader = ckpt["loader"]
        rng = ckpt["rng"]
        set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        barrier()  # the sample state is restored before any rank's loader reads it

    # ------------------------------------------------------------------ non-finite losses
    def _note_loss(self, loss: torch.Tensor) -> None:
        """Record on the device (no host sync) the first step whose loss is not finite; read by
        `_check_finite` at the log points and before every save."""
        new = ~torch.isfinite(loss.detach()).all() & (self._first_bad == NO_BAD_STEP)
        self._first_bad.masked_fill_(new, self.step)
        self._bad_loss = torch.where(new, loss.detach().float().reshape(()), self._bad_loss)

    def _weights_bad(self) -> torch.Tensor:
        tensors = [t for t in (*self.method.parameters(), *self.method.buffers()) if t.is_floating_point()]
        if not tensors:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return torch.stack([~torch.isfinite(t).all() for t in tensors]).any()

    def _where(self, step: int) -> str:
        epoch, b, steps, before = self._pos
        return f"step {step} (epoch {epoch}, batch {step - before} of {steps})"

    def _kept(self) -> str:
        if self._good is None:
            return "no checkpoint of this run was written before it"
        path, step = self._good
        return f"the last good checkpoint, {path} (step {step}), is kept"

    def _check_finite(self, weights: bool = False) -> None:
        """A NonFiniteError (one line, the same on every rank) when a loss since the start of `fit` was not
        finite, naming its step, or, with `weights`, when a weight or buffer is not finite. Reads the device-side
        record: a host sync, made only where the loop already syncs (log points) or is about to save."""
        if self._first_bad is None:
            return
        row = torch.stack([self._first_bad.double(), self._bad_loss.double(),
                           self._weights_bad().double() if weights else self._bad_loss.new_zeros(()).double()])
        table = gather_ranks(row[None]).cpu()
        r = int(table[:, 0].argmin())
        step = int(table[r, 0])
        rank = f" on rank {r}" if self.world > 1 else ""
        if step < NO_BAD_STEP:
            value = float(table[r, 1])
            self.log({"event": "nonfinite_loss", "step": step, "epoch": self._pos[0],
                      "batch": step - self._pos[3], "loss": str(value)})
            raise NonFiniteError(f"non-finite loss ({value:g}) at {self._where(step)}{rank}: training stopped; "
                                 f"{self._kept()}; lower optim.lr or check the data, or set "
                                 f"optim.skip_nonfinite=true to skip such steps")
        if bool(table[:, 2].any()):
            self.log({"event": "nonfinite_weights", "step": self.step, "epoch": self._pos[0]})
            raise NonFiniteError(f"non-finite weights after {self._where(self.step)}: training stopped before "
                                 f"saving them; {self._kept()}; lower optim.lr")

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def _open_loggers(self) -> None:
        """Rank 0's loggers of `logger=` (`trainers/loggers.py`): TensorBoard's event files beside log.jsonl, a
        W&B run; a resumed run hides TensorBoard's events after its checkpoint's step and continues its W&B run."""
        if self.main and self._loggers is None:
            self._loggers = open_loggers(self.cfg, self.out, self.step, resumed=self._resumed_from is not None)

    def _scalars(self, prefix: str, record: dict, skip: tuple[str, ...] = (), epoch: int | None = None) -> None:
        """The numeric fields of `record` as scalars `prefix/<name>` at the current step (rank 0's loggers)."""
        values = numeric(record, skip)
        for logger in self._loggers or ():
            logger.scalars(prefix, values, self.step, epoch)

    def _epoch_to_loggers(self, record: dict) -> None:
        """An epoch's record: its scalars (the epoch mean loss, updater fields, the kNN accuracy: the kNN curve)
        at x = epochs done, and the ContrastiveCrop box grid (its PNG) as an image."""
        if not self._loggers:
            return
        done = record["epoch"] + 1
        self._scalars("epoch", record, skip=("epoch", "step"), epoch=done)
        grid = read_png(record.get("box_grid", ""))
        for logger in self._loggers:
            if grid is not None:
                logger.image("ccrop/boxes", grid, self.step, epoch=done)
            logger.flush()

    def _console_line(self, r: dict, steps: int) -> None:
        """One compact line on stdout (batch jobs: stdout is not a terminal, so no progress bar)."""
        print(f"epoch {r['epoch']} step {r['step']} (batch {r['batch']}/{steps})  loss {r['loss']:.4f}  "
              f"lr {r['lr']:.4g}  images/s {r['images_per_s']:.1f}  data wait {100 * r['data_wait']:.0f}%",
              flush=True)

    def _interrupted(self) -> TrainingInterrupted:
        """What Ctrl-C during `fit` tells the user: where the run stopped, the checkpoint a resume starts from,
        and the --resume value that continues it."""
        where = (f"interrupted after {self._where(self.step)}" if self._pos[2] else
                 f"interrupted after step {self.step}" if self.step else "interrupted before the first step")
        if self._good is None:
            return TrainingInterrupted(f"{where}; no checkpoint of this run yet: a resume starts again from step 0",
                                       "auto", self.main)
        path, step = self._good
        inside = Path(path).parent.resolve() == self.out.resolve()
        return TrainingInterrupted(f"{where}; the last checkpoint is {path} (step {step}): a resume starts "
                                   f"there", "auto" if inside else str(path), self.main)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train from where the trainer stands (step 0 or the resumed checkpoint) to the end or `max_steps`;
        returns the final metrics. Ctrl-C raises TrainingInterrupted, which says how to resume."""
        cfg = self.cfg
        from tqdm import tqdm

        self._first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)
        self._open_loggers()
        if self.local_rank == 0:  # (once per node: the ranks of a node share its cores)
            print(workers_line(cfg.data.workers), flush=True)
        self.log({"event": "start", "step": self.step, "epoch": self.epoch, "world": self.world,
                  "resumed_from": self._resumed_from})
        try:
            with self._ctrl_c_finishes_the_step():
                result = self._fit(cfg, tqdm)
            if self._stop_asked and self.epoch < cfg.epochs:  # (not when Ctrl-C came after the last epoch's steps)
                raise KeyboardInterrupt
            return result
        except KeyboardInterrupt:
            raise self._interrupted() from None

    @contextlib.contextmanager
    def _ctrl_c_finishes_the_step(self) -> Iterator[None]:
        """On a single process, a first Ctrl-C lets the step in progress finish, saves a checkpoint there and
        stops the run (`fit` then raises TrainingInterrupted); a second stops at once, from the last checkpoint.
        Under torchrun the ranks could not agree on the step to stop at without a collective per step, so there
        Ctrl-C stops at once. Left alone where SIGINT is not Python's default (ignored, or the caller's own)."""
        if (self.world > 1 or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return

        owner = os.getpid()

        def asked(signum: int, frame: Any) -> None:
            if os.getpid() != owner:  # a forked loader worker: it serves on until the trainer stops it
                return
            self._stop_asked = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C stops at once
            print("\nviewpipe: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, asked)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _batches(self, loader: Any) -> Iterator[Batch]:
        """`loader`'s batches; after a first Ctrl-C, a loader failing to deliver the next batch (its worker
        processes got the SIGINT too) ends the epoch's batches instead of the run: the steps done are whole."""
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception:
                if self._stop_asked:
                    return
                raise
            yield batch

    def _fit(self, cfg: TrainConfig, tqdm: Any) -> dict:
        """The epoch loop: each epoch's steps from where the loader stands, then its end (`_end_epoch`)."""
        self._steps_this_run, last = 0, {}
        while self.epoch < cfg.epochs and not self._stop_asked:
            run = self._start_epoch(self.epoch)
            bar = tqdm(total=run.steps, initial=run.start, desc=f"epoch {run.epoch}", unit="step", leave=False,
                       disable=True if not self.main or self._console else None)
            try:
                stop, last = self._epoch_steps(run, bar, last)
            finally:
                bar.close()
            if run.skipped and run.skipped == run.b - run.start:
                raise NonFiniteError(f"every step of epoch {run.epoch} ({run.skipped}) had a non-finite loss and "
                                     f"was skipped: training stopped; {self._kept()}; lower optim.lr or check the data")
            if (stop or self._stop_asked) and run.b < run.steps:  # (also when Ctrl-C came while waiting for a batch)
                self.save({"epoch": run.epoch, "batch": run.b})
                break
            self._end_epoch(run)
            if stop:
                break
        return {"epoch": self.epoch, "step": self.step, "history": self.history, "last": last}

    def _start_epoch(self, epoch: int) -> _EpochRun:
        """The state updaters due before `epoch` (not when resuming inside it), its loader at its first batch
        or at the resumed one, and the method and model set for training."""
        saved = self._resume_loader
        resume = saved if saved and saved["epoch"] == epoch else None
        before = self.update_state(epoch, before_epoch=True) if resume is None or resume["batch"] == 0 else {}
        loader = self.loader(epoch)
        if resume is not None:
            loader.load_state_dict(resume)
        else:
            loader.set_epoch(epoch)
        self._resume_loader = None
        self.method.set_epoch(epoch)
        self.model.train()
        steps, d = len(loader), self.cfg.data
        if steps == 0:
            raise ViewpipeError(f"the {d.backend} loader has no full batch of data.batch_size {d.batch_size} for "
                                f"{self.world} rank(s) in {self.n} images: lower data.batch_size")
        start = resume["batch"] if resume is not None else 0
        return _EpochRun(epoch, loader, start, steps, before, b=start, loss_sum=torch.zeros((), device=self.device))

    def _epoch_steps(self, run: _EpochRun, bar: Any, last: dict) -> tuple[bool, dict]:
        """The epoch's training steps with their records and checks; returns (stop the run, last log record)."""
        cfg = self.cfg
        for batch in self._batches(run.loader):
            t_data = time.perf_counter()
            lr = lr_at(cfg, run.epoch, run.b, run.steps)
            loss, logs = self.train_step(batch, lr, (self.step + 1) / (cfg.epochs * run.steps))
            self.step, run.b, self._steps_this_run = self.step + 1, run.b + 1, self._steps_this_run + 1
            self._pos = (run.epoch, run.b, run.steps, self.step - run.b)
            self._count_loss(run, loss)
            if self.device.type == "cuda" and (self.step % cfg.log_every == 0):
                torch.cuda.synchronize()
            run.timed(t_data, len(batch.indices) * self.world)
            bar.update(1)
            log_now = self.step % cfg.log_every == 0 or run.b == run.steps
            save_now = cfg.save_every and self.step % cfg.save_every == 0 and run.b < run.steps
            stop = bool(cfg.max_steps and self._steps_this_run >= cfg.max_steps) or self._stop_asked
            if log_now or save_now or stop:
                self._check_finite()  # stops at the first check after a non-finite loss, naming its step
            if log_now:
                last = self._log_point(run, loss, lr, logs, bar)
            if save_now:
                self.save({"epoch": run.epoch, "batch": run.b})
            if stop:
                return True, last
        return False, last

    def _count_loss(self, run: _EpochRun, loss: torch.Tensor) -> None:
        """A step's loss into the epoch's mean, or counted as skipped (skip mode: train_step read it on the host)."""
        if self._skipped_last:
            run.skipped += 1
            self._skipped(loss)
            return
        run.loss_sum, run.loss_n = run.loss_sum + loss.detach().float(), run.loss_n + 1
        if not self.cfg.optim.skip_nonfinite:
            self._note_loss(loss)

    def _log_point(self, run: _EpochRun, loss: torch.Tensor, lr: float, logs: dict, bar: Any) -> dict:
        """The record of a log point (loss, lr, the method's logs, throughput, data wait): to log.jsonl,
        TensorBoard, the console or the progress bar; the throughput meters restart."""
        busy = max(1e-9, run.wait + run.busy)
        last = {"step": self.step, "epoch": run.epoch, "batch": run.b, "loss": float(loss.detach()), "lr": lr,
                **{k: float(v) for k, v in logs.items()}, "images_per_s": run.images / busy,
                "data_wait": run.wait / busy}
        if self.cfg.optim.skip_nonfinite:
            last["skipped_nonfinite"] = self.skipped_nonfinite
        self.log(last)
        self._scalars("train", last, skip=("step", "epoch", "batch"))
        if self._console:
            self._console_line(last, run.steps)
        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}",
                        wait=f"{100 * last['data_wait']:.0f}%")
        run.wait = run.busy = 0.0
        run.images = 0
        return last

    def _end_epoch(self, run: _EpochRun) -> None:
        """After an epoch's last step: one network on every rank, the updaters due after it, the kNN monitor
        when due, the epoch's record (printed, logged) and its checkpoint."""
        cfg, epoch = self.cfg, run.epoch
        self.epoch = epoch + 1
        broadcast_bn_stats(self.method)  # one network for the passes below and the next epoch's mining
        # the epoch's mean loss (of the batches this process ran: after a resume, those after the checkpoint)
        record: dict = {"epoch": epoch, "step": self.step, "loss": float(run.loss_sum) / max(1, run.loss_n),
                        **run.before}
        if run.skipped:
            record["skipped_nonfinite"] = run.skipped
        record |= self.update_state(epoch, before_epoch=False)
        if cfg.data.test_path and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            record["knn_top1"] = self.knn()
        self.history.append(record)
        if self.main:
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                            if v is not None), flush=True)
        self.log({"event": "epoch", **record})
        self._epoch_to_loggers(record)
        self.save({"epoch": self.epoch, "batch": 0})

    def train_step(self, batch: Batch, lr: float, progress: float) -> tuple[torch.Tensor, dict]:
        """One optimizer step on a loader `Batch` (views, labels, indices, neighbours with companions)."""
        views = [v.to(self.device, non_blocking=True) for v in batch.views]
        if self.cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        info = {"labels": batch.labels, "indices": batch.indices}
        if batch.neighbours is not None:
            info["neighbours"] = batch.neighbours
        set_lr(self.optimizer, lr, self.cfg.optim.lr)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.cfg.amp):
            loss, logs = self.model(views, info)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._skipped_last = False
        if self.cfg.optim.skip_nonfinite:
            # skipping needs the answer on the host before the update: one sync per step in this mode only
            finite = torch.isfinite(loss.detach()).all().to(torch.int32)
            all_reduce_min(finite)  # the gradients were averaged over the ranks: one rank's NaN is every rank's
            if not bool(finite):
                self.optimizer.zero_grad(set_to_none=True)
                self._skipped_last = True
                return loss, logs
        self.optimizer.step()
        self.method.after_step(progress)
        return loss, logs

    def _skipped(self, loss: torch.Tensor) -> None:
        """Count, log and report a step skipped for its non-finite loss (optim.skip_nonfinite)."""
        self.skipped_nonfinite += 1
        value = float(loss.detach())
        self.log({"event": "skipped_nonfinite", "step": self.step, "epoch": self._pos[0],
                  "batch": self._pos[1], "loss": str(value)})
        if self.main:
            warn(f"non-finite loss ({value:g}) at {self._where(self.step)}: its update was skipped "
                 f"({self.skipped_nonfinite} so far; optim.skip_nonfinite=true)")

    def update_state(self, epoch: int, before_epoch: bool) -> dict:
        """Run the state updaters due before (or after) `epoch` (every rank); returns their log fields."""
        logs: dict = {}
        for u in self.updaters:
            if u.before_epoch == before_epoch and u.due(epoch):
                logs |= u.run(self.method, self.data, epoch)
        return logs

    def knn(self) -> float:
        from viewpipe.trainers.eval import knn_accuracy

        return knn_accuracy(self.method.backbone, self.source, self._knn_test, self.clean, k=self.cfg.knn_k,
                            t=self.cfg.knn_t)

    def close(self) -> None:
        if self._loader is not None:  # (every Loader has close)
            self._loader.close()
        if self._log is not None:
            self._log.close()
        loggers, self._loggers = getattr(self, "_loggers", None) or [], []
        try:
            for logger in loggers:
                logger.close()
        finally:
            self.state.close()


class PeerLost(ViewpipeError):
    """Under torchrun, a collective failed because another rank is gone (killed, its node down) or did not answer
    within `dist_timeout_s`: this rank stops, its shared memory removed; the message names the lost rank."""


def pretrain(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Train `cfg` to its end (or `max_steps`) and return the final metrics. Under torchrun, a rank lost
    mid-run stops the others with a PeerLost naming it (one line; `--resume auto` on every node continues)."""
    where: list[Trainer] = []
    try:
        return _pretrain(cfg, resume, where)
    except Exception as exc:
        if not peer_failure(exc):
            raise
        me = where[0] if where else None
        at = f" at step {me.step} (epoch {me._pos[0]})" if me is not None else " while starting"
        rank = me.rank if me is not None else int(os.environ.get("RANK", 0))
        raise PeerLost(f"rank {rank}{at}: {lost_rank(exc, rank)}; this rank stopped (its shared memory removed); "
                       f"resume every node with --resume auto") from None


def _pretrain(cfg: TrainConfig, resume: str | None, where: list) -> dict:
    finished = False
    try:
        trainer = Trainer(cfg, resume)
        where.append(trainer)
        try:
            result = trainer.fit()
            finished = True
            return result
        finally:
            trainer.close()
    finally:
        teardown(wait=finished)  # the process group setup() made, before the interpreter exits
