"""Pretraining configuration: dataclasses, loaded from YAML and overridden from the command line with dotted
keys (`optim.lr=0.3 ccrop.alpha=0.6`). Unknown keys and badly typed values are one-line errors."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viewpipe.errors import ViewpipeError


@dataclass
class DataConfig:
    """The training data, its loader backend and the views made from it."""

    path: str = ""  # image folder, .npz JPEG collection or converted dataset (dali/ffcv need a converted one)
    split: str = "train"
    test_path: str = ""  # the kNN monitor's test set (empty: the monitor is off)
    test_split: str = "test"
    backend: str = "torch"  # torch | dali | ffcv
    size: int = 32  # view side
    preset: str = "mocov2_small"  # augmentation preset (viewpipe.augment.PRESETS)
    views: int = 2
    batch_size: int = 512  # global: divided among ranks
    workers: int = 8
    # dali backend only: the share of images nvJPEG sends to the GPU's hardware JPEG decoder (A100, H100), the
    # rest decoded by CUDA; in [0, 1]; ignored without a GPU
    hw_decoder_load: float = field(default=0.65, metadata={"range": (0.0, 1.0)})


@dataclass
class CCropConfig:
    """ContrastiveCrop (SPEC.md §1): plain RandomResizedCrop until the first box update, which runs after
    epoch `warmup`, then after every epoch e with e % interval == 0 (never after the last)."""

    enabled: bool = True
    alpha: float = 0.1
    warmup: int = 100
    interval: int = 100
    threshold: float = 0.1
    size: int = 0  # side of the clean images of the box pass (0: data.size)
    grid: int = 32  # images in the PNG written after each update (0: none)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule: linear warm-up, then cosine down to lr × final_lr_ratio."""

    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 0.1
    per_epoch: bool = True  # the official ContrastiveCrop code steps the cosine once per epoch


@dataclass
class TrainConfig:
    """A pretraining run. `method_args` go to the method's constructor (see each method's file)."""

    method: str = "mocov2"
    backbone: str = "resnet18_cifar"
    method_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 500
    data: DataConfig = field(default_factory=DataConfig)
    ccrop: CCropConfig = field(default_factory=CCropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "runs/run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on the GPU (never on the CPU)
    channels_last: bool = True
    sync_bn: bool = False
    knn_every: int = 10  # epochs between kNN monitor runs (0: off); also after the last epoch
    knn_k: int = 200
    knn_t: float = 0.1
    log_every: int = 20  # steps between log lines
    save_every: int = 0  # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    max_steps: int = 0  # stop after this many steps of this process (0: no limit): for tests and benchmarks


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML) as type `tp`, or a one-line error."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ViewpipeError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ViewpipeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        return tuple(_coerce(v, args[0] if args else Any, where) for v in value)
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ViewpipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ViewpipeError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _check_range(value: Any, f: dataclasses.Field, where: str) -> Any:
    """`value` when it lies in the field's `range` metadata (inclusive), or a one-line error."""
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        if not lo <= value <= hi:
            raise ViewpipeError(f"{where}: expected a number in [{lo:g}, {hi:g}], got {value!r}")
    return value


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """A config dataclass from a (nested) dict; unknown keys and values outside a field's range are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ViewpipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(fields))}")
    return cls(**{k: _check_range(_coerce(v, hints[k], f"{where}.{k}"), fields[k], f"{where}.{k}")
                  for k, v in values.items()})


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings applied to a nested dict (values parsed as YAML: 0.3, true, [1, 2], text)."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ViewpipeError(f"override {item!r}: expected key=value, e.g. optim.lr=0.3")
        node = values
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ViewpipeError(f"override {item!r}: {p} is not a section")
        node[last] = yaml.safe_load(raw) if raw != "" else ""
    return values


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults) with command-line overrides."""
    import yaml

    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ViewpipeError(f"{p}: no such config file; see configs/ for examples")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ViewpipeError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ViewpipeError(f"{p}: expected a mapping of settings at the top level")
    return from_dict(TrainConfig, apply_overrides(values, list(overrides)), str(path or "config"))


def to_dict(cfg: TrainConfig) -> dict:
    """The config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
