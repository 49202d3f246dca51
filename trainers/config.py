"""Pretraining configuration: dataclasses, loaded from YAML and overridden from the command line with dotted
keys (`optim.lr=0.3 ccrop.alpha=0.6`). Unknown keys, badly typed values and values out of range (`validate`,
one place for every check that needs no data) are one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viewpipe.errors import ViewpipeError


def bounded(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Any:
    """A numeric field whose values must lie between `lo` and `hi` (None: unbounded; inclusive unless
    `lo_open`/`hi_open`); for a tuple field, every element. NaN and infinities are always refused. Checked by
    `validate`, with the field's name as the user wrote it."""
    return field(default=default, metadata={"range": (lo, hi), "open": (lo_open, hi_open)})


def choice(default: str, *options: str) -> Any:
    """A text field whose value must be one of `options` (the default first). Checked by `validate`."""
    return field(default=default, metadata={"choices": (default, *options)})


@dataclass
class DataConfig:
    """The training data, its loader backend and the views made from it."""

    path: str = ""  # image folder, .npz JPEG collection or converted dataset (dali/ffcv need a converted one)
    split: str = "train"
    test_path: str = ""  # the kNN monitor's test set (empty: the monitor is off)
    test_split: str = "test"
    backend: str = choice("torch", "dali", "ffcv", "memory")
    size: int = bounded(32, 1)  # view side
    preset: str = "mocov2_small"  # augmentation preset (viewpipe.augment.PRESETS)
    views: int = bounded(2, 1)  # per sample; each method says how many it takes (its class's `views`)
    # multi-crop view groups, COUNTxSIZE[@MIN-MAX][:nobox],... (e.g. "2x224,6x96@0.05-0.2"); when set it replaces
    # `views` (`size` stays the image size of the clean passes: box update, mining, kNN)
    multicrop: str = ""
    batch_size: int = bounded(512, 1)  # global: divided among ranks
    workers: int = bounded(8, 0)
    # dali backend only: the share of images nvJPEG sends to the GPU's hardware JPEG decoder (A100, H100), the
    # rest decoded by CUDA; in [0, 1]; ignored without a GPU
    hw_decoder_load: float = bounded(0.65, 0.0, 1.0)


@dataclass
class CCropConfig:
    """ContrastiveCrop (Peng et al., CVPR 2022; `trainers/ccrop.py`): plain RandomResizedCrop until the first box
    update, which runs after epoch `warmup`, then after every epoch e with e % interval == 0 (never after the
    last)."""

    enabled: bool = True
    alpha: float = bounded(0.1, 0.0, lo_open=True)  # Beta(α, α) of the crop centre within the box
    warmup: int = bounded(100, 0)
    interval: int = bounded(100, 1)
    threshold: float = bounded(0.1, 0.0, 1.0)
    size: int = bounded(0, 0)  # side of the clean images of the box pass (0: data.size)
    grid: int = bounded(32, 0)  # images in the PNG written after each update (0: none)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule: linear warm-up, then cosine down to lr × final_lr_ratio."""

    name: str = choice("sgd", "lars", "adamw")
    lr: float = bounded(0.5, 0.0)
    momentum: float = bounded(0.9, 0.0, 1.0, hi_open=True)
    weight_decay: float = bounded(1e-4, 0.0)
    betas: tuple[float, float] = bounded((0.9, 0.999), 0.0, 1.0, hi_open=True)  # adamw
    warmup_epochs: float = bounded(0.0, 0.0)
    final_lr_ratio: float = bounded(0.1, 0.0)
    per_epoch: bool = True  # the official ContrastiveCrop code steps the cosine once per epoch
    # a step whose loss is NaN or infinite: false stops the run with an error naming the step (the last good
    # checkpoint is kept); true skips the step's update, counts it (`skipped_nonfinite` in the log) and goes on
    skip_nonfinite: bool = False


@dataclass
class TrainConfig:
    """A pretraining run. `method_args` go to the method's constructor (see each method's file)."""

    method: str = "mocov2"
    backbone: str = "resnet18_cifar"
    method_args: dict[str, Any] = field(default_factory=dict)
    backbone_args: dict[str, Any] = field(default_factory=dict)  # go to the backbone's constructor (trainers/models.py)
    epochs: int = bounded(500, 1)
    data: DataConfig = field(default_factory=DataConfig)
    ccrop: CCropConfig = field(default_factory=CCropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "runs/run"
    seed: int = bounded(0, 0)
    device: str = choice("auto", "cpu", "cuda")
    amp: bool = True  # bf16 autocast on the GPU (never on the CPU)
    channels_last: bool = True
    sync_bn: bool = False
    knn_every: int = bounded(10, 0)  # epochs between kNN monitor runs (0: off); also after the last epoch
    knn_k: int = bounded(200, 1)
    knn_t: float = bounded(0.1, 0.0, lo_open=True)
    log_every: int = bounded(20, 1)  # steps between log lines
    save_every: int = bounded(0, 0)  # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    max_steps: int = bounded(0, 0)  # stop after this many steps of this process (0: no limit): for tests and benchmarks


# method_args whose range is the same in every method that takes them: (lo, hi, lo_open, hi_open, integer)
METHOD_ARG_RANGES: dict[str, tuple[float | None, float | None, bool, bool, bool]] = {
    "tau": (0.0, None, True, False, False),  # temperatures
    "momentum": (0.0, 1.0, False, False, False),
    "queue": (1, None, False, False, True), "bank": (1, None, False, False, True),
    "dim": (1, None, False, False, True), "hidden": (0, None, False, False, True),
    "mlp_dim": (1, None, False, False, True), "pred_hidden": (1, None, False, False, True),
    "k": (1, None, False, False, True), "topk": (1, None, False, False, True),
    "interval": (1, None, False, False, True), "switch_epoch": (0, None, False, False, True),
    "cutmix_beta": (0.0, None, True, False, False), "mine_resize": (0, None, False, False, True),
    "proj_layers": (0, None, False, False, True),
}


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


def _describe(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, integer: bool) -> str:
    what = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{what} {'<' if hi_open else '<='} {hi:g}"
    return what


def _check_number(value: Any, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, integer: bool,
                  where: str) -> None:
    """A one-line error unless `value` is a finite number (an integer when `integer`) within the bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or isinstance(value, int))
    ok = ok and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ViewpipeError(f"{where}: expected {_describe(lo, hi, lo_open, hi_open, integer)}, got {value!r}")


def _check_field(value: Any, f: dataclasses.Field, where: str) -> None:
    """A one-line error unless `value` satisfies the field's metadata: `range` (lo, hi) with `open`
    (lo_open, hi_open) from `bounded` (for a tuple, every element), `choices` from `choice`."""
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ViewpipeError(f"{where}: expected one of {', '.join(f.metadata['choices'])}, got {value!r}")
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        lo_open, hi_open = f.metadata.get("open", (False, False))
        integer = isinstance(f.default, int) and not isinstance(f.default, bool)
        for v in value if isinstance(value, tuple) else (value,):
            _check_number(v, lo, hi, lo_open, hi_open, integer, where)


def _check_fields(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{where}.{f.name}")
        else:
            _check_field(value, f, f"{where}.{f.name}")


def validate(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """`cfg` when every value is in range (the `bounded` and `choice` fields, the method's views, the
    method_args whose range is known), or a one-line ViewpipeError naming the first offending key as written
    (`config.optim.lr: expected a number >= 0, got -0.1`; `where` is the config file, or "config"). What
    depends on the data or the ranks (batch size against the dataset, divisibility) is checked by the Trainer
    before training."""
    _check_fields(cfg, where)
    from viewpipe.trainers.base import METHODS  # (the registry: its classes say how many views they take)

    lo, hi = METHODS[cfg.method].views if cfg.method in METHODS else (2, None)
    views, key = cfg.data.views, "views"
    if cfg.data.multicrop:
        from viewpipe.pipelines import parse_views

        try:
            views, key = sum(g.count for g in parse_views(cfg.data.multicrop)), "multicrop"
        except ViewpipeError as exc:
            raise ViewpipeError(f"{where}.data.multicrop: {exc}") from None
    if views < lo or (hi is not None and views > hi):
        need = f"exactly {lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise ViewpipeError(f"{where}.data.{key}: {cfg.method} needs {need} views of each sample, got {views}")
    if not isinstance(cfg.method_args, dict):
        raise ViewpipeError(f"{where}.method_args: expected a mapping, got {cfg.method_args!r}")
    for key, value in cfg.method_args.items():
        if key in METHOD_ARG_RANGES:
            _check_number(value, *METHOD_ARG_RANGES[key], f"{where}.method_args.{key}")
    return cfg


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """A config dataclass from a (nested) dict; unknown keys and badly typed values are errors (ranges: `validate`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ViewpipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


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
    """A TrainConfig from a YAML file (or the defaults) with command-line overrides, validated (`validate`)."""
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
    where = str(path or "config")
    return validate(from_dict(TrainConfig, apply_overrides(values, list(overrides)), where), where)


def to_dict(cfg: TrainConfig) -> dict:
    """The config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
