"""Where rank 0 of a run sends its records besides log.jsonl (`logger=`): TensorBoard event files in the run
folder (tensorboardX) and Weights & Biases (the `wandb` package: `pip install viewpipe[wandb]`), each a `Logger`
that takes the same scalars and images.

Both put the step records (`train/<name>`) at x = the global step. An epoch's record (`epoch/<name>`: the mean
loss, the updaters' fields, `epoch/knn_top1`, the kNN curve) and the ContrastiveCrop box grid (`ccrop/boxes`)
are at x = epochs done: TensorBoard writes them at that step; W&B logs every record at its global step (W&B's
steps only grow) with a field `epoch` = epochs done, made the x-axis of `epoch/*` and `ccrop/*` by
`define_metric(..., step_metric="epoch")`. A resumed run continues its W&B run (the id is kept in
`OUT/wandb_id`). The steps it runs again after the checkpoint replace the old ones in TensorBoard (purge_step);
online, W&B ignores them with a warning (its steps only grow): an exact resume logs the same losses."""

from __future__ import annotations

import importlib.util
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from viewpipe.errors import ViewpipeError

LOGGERS = ("tensorboard", "wandb")
WANDB_ID = "wandb_id"  # the run folder's file holding its W&B run id (a resume continues that run)


def logger_names(spec: str) -> list[str]:
    """The loggers named by `logger=` ("tensorboard", "wandb", "tensorboard,wandb"; "" or "none": none)."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def check_logger_spec(spec: str, where: str) -> None:
    """A one-line ViewpipeError when `logger=` names a logger there is not."""
    unknown = [n for n in logger_names(spec) if n not in LOGGERS]
    if unknown:
        raise ViewpipeError(f"{where}: unknown logger {unknown[0]!r} in {spec!r}; known: {', '.join(LOGGERS)} "
                            f"(comma-separated, e.g. logger=tensorboard,wandb; none: log.jsonl only)")


def check_available(spec: str) -> None:
    """A one-line ViewpipeError when a logger's package is not installed (checked before training starts)."""
    if "wandb" in logger_names(spec) and importlib.util.find_spec("wandb") is None:
        raise ViewpipeError("logger=wandb needs the wandb package: pip install viewpipe[wandb] (or pip install "
                            "wandb), or leave wandb out of logger=")


def numeric(record: dict, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numeric fields of `record` (not bools, not those in `skip`): what the loggers plot."""
    return {k: v for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Logger:
    """One destination of a run's scalars and images. `step`: the global training step; `epoch`: epochs done,
    given for the records that are per epoch (their x-axis)."""

    def scalars(self, prefix: str, values: dict[str, float], step: int, epoch: int | None = None) -> None:
        """`values` as scalars `prefix/<name>`."""

    def image(self, tag: str, image: np.ndarray, step: int, epoch: int | None = None) -> None:
        """An (H, W, 3) uint8 image."""

    def flush(self) -> None:
        """Write out what is buffered."""

    def close(self) -> None:
        """Flush and release the logger."""


class TensorBoardLogger(Logger):
    """Event files in the run folder beside log.jsonl (tensorboardX). A resumed run writes a new file that hides
    the old files' events after its checkpoint's step (purge_step), as it trims log.jsonl."""

    def __init__(self, out: Path, step: int) -> None:
        from tensorboardX import SummaryWriter

        # tensorboardX names a file by the second it opens (events.out.tfevents.<s>.<host>): a resume within the
        # same second would replace the file before it; the nanoseconds after it keep both, in order
        self.writer = SummaryWriter(logdir=str(out), purge_step=step + 1 if step else None,
                                    filename_suffix=f".{time.time_ns() % 10**9:09d}")

    def scalars(self, prefix: str, values: dict[str, float], step: int, epoch: int | None = None) -> None:
        """Each value at x = `epoch` when given, else `step`."""
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step if epoch is None else epoch)

    def image(self, tag: str, image: np.ndarray, step: int, epoch: int | None = None) -> None:
        """The image at x = `epoch` when given, else `step`."""
        self.writer.add_image(tag, image, step if epoch is None else epoch, dataformats="HWC")

    def flush(self) -> None:
        """The event file written out."""
        self.writer.flush()

    def close(self) -> None:
        """The event file closed."""
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run (`wandb.init`) with the run's config, its files under `OUT/wandb/`; a resumed run (`resumed`)
    continues the W&B run whose id `OUT/wandb_id` holds, a new one starts a new W&B run and keeps its id there."""

    def __init__(self, cfg: Any, out: Path, resumed: bool) -> None:
        import wandb

        from viewpipe.trainers.config import to_dict

        id_file, w = Path(out) / WANDB_ID, cfg.wandb
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        self.wandb = wandb
        try:
            self.run = wandb.init(project=w.project or None, entity=w.entity or None, name=w.name or Path(out).name,
                                  tags=list(w.tags) or None, mode=None if w.mode == "auto" else w.mode, dir=str(out),
                                  config=to_dict(cfg), id=run_id, resume="allow")
        except Exception as exc:  # (not logged in, no network, a bad entity: wandb's own errors)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ViewpipeError(f"logger=wandb: wandb.init failed ({first[:200]}); wandb.mode=offline logs "
                                f"without a network (upload later with wandb sync)") from None
        self.run.define_metric("epoch")
        for pattern in ("epoch/*", "ccrop/*"):
            self.run.define_metric(pattern, step_metric="epoch")

    def _log(self, values: dict[str, Any], step: int, epoch: int | None) -> None:
        self.run.log(values if epoch is None else {**values, "epoch": epoch}, step=step)

    def scalars(self, prefix: str, values: dict[str, float], step: int, epoch: int | None = None) -> None:
        """One W&B record at `step` (with `epoch`, the x-axis of the epoch curves, when given)."""
        self._log({f"{prefix}/{k}": v for k, v in values.items()}, step, epoch)

    def image(self, tag: str, image: np.ndarray, step: int, epoch: int | None = None) -> None:
        """A `wandb.Image` at `step` (with `epoch` when given)."""
        self._log({tag: self.wandb.Image(image)}, step, epoch)

    def close(self) -> None:
        """The W&B run finished (an offline run's files complete, an online run uploaded)."""
        self.run.finish()


def open_loggers(cfg: Any, out: Path, step: int, resumed: bool) -> list[Logger]:
    """Rank 0's loggers of `cfg.logger`, the run standing at `step` (`resumed`: from a checkpoint of it)."""
    from viewpipe.trainers.checkpoint import warn

    loggers: list[Logger] = []
    for name in logger_names(cfg.logger):
        if name == "tensorboard":
            try:
                loggers.append(TensorBoardLogger(out, step))
            except ImportError:
                warn("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)")
        elif name == "wandb":
            loggers.append(WandbLogger(cfg, out, resumed))
    return loggers


def read_png(path: str | Path) -> np.ndarray | None:
    """The PNG at `path` as an (H, W, 3) uint8 array, or None when there is no such file."""
    if not path or not Path(path).is_file():
        return None
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
