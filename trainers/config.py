"""Pretraining configuration. The dataclasses below are the schema; a config is loaded as an OmegaConf
structured config: a YAML file (a path, or the name of a config shipped with viewpipe) merged with dotted
command-line overrides (`optim.lr=0.3 method_args={queue:1024}`), `${...}` interpolation resolved, then checked.
Unknown keys, badly typed values and values out of range (`validate`) are one-line errors naming the key and,
for an override, the override. `viewpipe pretrain --help-config` lists every key (`describe`)."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from viewpipe.errors import ViewpipeError

_MISSING = dataclasses.MISSING


def bounded(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False, help: str = "", ordered: bool = False, integer: bool | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A numeric field whose values must lie between `lo` and `hi` (None: unbounded; inclusive unless
    `lo_open`/`hi_open`); for a tuple field, every element (`ordered`: and min <= max). NaN and infinities are
    always refused; None passes (an optional field). Checked by `validate`, with the field's name as the user
    wrote it. `help`: the key's line in `--help-config`; `factory`: a default computed when the config is made."""
    meta = {"range": (lo, hi), "open": (lo_open, hi_open), "help": help, "ordered": ordered,
            "integer": isinstance(default, int) and not isinstance(default, bool) if integer is None else integer}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice(default: str, *options: str, help: str = "") -> Any:
    """A text field whose value must be one of `options` (the default first). Checked by `validate`."""
    return field(default=default, metadata={"choices": (default, *options), "help": help})


def choices_of(f: Any) -> tuple[str, ...]:
    """The values a `choice` field takes, its default first (a field may give a function of none, read when
    asked: the registered backends)."""
    known = f.metadata["choices"]
    if not callable(known):
        return tuple(known)
    return (f.default, *(k for k in known() if k != f.default))


def backend_names() -> tuple[str, ...]:
    """The registered loader backends (`viewpipe.pipelines.backends`), the values of data.backend."""
    from viewpipe.pipelines import backends

    return tuple(backends())


def doc(default: Any = _MISSING, help: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A field with no range to check, and its `--help-config` line."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, as torch's DataLoader counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # (not on Linux)
        return max(1, os.cpu_count() or 1)


def effective_workers(workers: int) -> int:
    """`data.workers` capped at the cores there are: more loader processes than cores only compete (and torch
    warns about it)."""
    return min(workers, cpu_cores())


@dataclass
class CropSettings:
    """RandomResizedCrop's sampling of every view's window (α, the Beta of the box-centred crops, is ccrop.alpha)."""

    scale: tuple[float, float] = bounded((0.2, 1.0), 0.0, 1.0, lo_open=True, ordered=True,
                                         help="[min, max] area of a crop as a fraction of the image's")
    ratio: tuple[float, float] = bounded((3 / 4, 4 / 3), 0.0, lo_open=True, ordered=True,
                                         help="[min, max] aspect ratio (width / height) of a crop")
    tries: int = bounded(10, 1, help="draws before falling back to a centred crop of the clamped ratio")


@dataclass
class ViewAugmentSettings:
    """Photometric settings of a view (viewpipe.augment.ViewAugment); null: keep the preset's."""

    flip: float | None = bounded(None, 0.0, 1.0, integer=False, help="probability of a horizontal flip")
    jitter: tuple[float, float, float, float] | None = bounded(
        None, 0.0, integer=False, help="colour jitter strengths [brightness, contrast, saturation, hue]")
    jitter_p: float | None = bounded(None, 0.0, 1.0, integer=False, help="probability of the colour jitter")
    grayscale: float | None = bounded(None, 0.0, 1.0, integer=False, help="probability of grayscale")
    blur: float | None = bounded(None, 0.0, 1.0, integer=False, help="probability of a Gaussian blur")
    blur_sigma: tuple[float, float] | None = bounded(None, 0.0, lo_open=True, ordered=True, integer=False,
                                                     help="[min, max] σ of the blur")
    solarize: float | None = bounded(None, 0.0, 1.0, integer=False, help="probability of solarization")
    solarize_threshold: float | None = bounded(None, 0.0, 1.0, integer=False,
                                               help="solarize the values above this (images in [0, 1])")


@dataclass
class AugmentSettings(ViewAugmentSettings):
    """A view group's augmentation: a preset (viewpipe.augment.PRESETS) with any of its settings changed; the
    photometric keys apply to every view, `views` to one view each. null everywhere: inherit (data.preset, then
    data.augment, then the group's own)."""

    preset: str | None = doc(None, "augmentation preset (mocov2, mocov2_small, simclr, byol); null: data.preset")
    views: list[ViewAugmentSettings] = doc(
        help="per-view settings over the preset's, view v taking entry v % len (e.g. BYOL's asymmetric pair); "
             "[]: none", factory=list)
    mean: tuple[float, float, float] | None = bounded(None, integer=False, help="normalisation mean per channel")
    std: tuple[float, float, float] | None = bounded(None, 0.0, lo_open=True, integer=False,
                                                     help="normalisation std per channel")
    blur_kernel: int | None = bounded(None, 0, integer=True, help="odd blur kernel side; 0: about 10% of the size")


@dataclass
class GroupSettings:
    """One multi-crop view group: `count` views of `size` px, their own crop and augmentation (null: data's)."""

    count: int = bounded(2, 1, help="views of each image in this group")
    size: int = bounded(0, 0, help="the views' side in px (0: data.size)")
    scale: tuple[float, float] | None = bounded(None, 0.0, 1.0, lo_open=True, ordered=True, integer=False,
                                                help="crop area range (null: data.crop.scale)")
    ratio: tuple[float, float] | None = bounded(None, 0.0, lo_open=True, ordered=True, integer=False,
                                                help="crop aspect-ratio range (null: data.crop.ratio)")
    tries: int | None = bounded(None, 1, integer=True, help="crop draws (null: data.crop.tries)")
    box: bool = doc(True, "centre the crops in the ContrastiveCrop boxes (when the run uses boxes)")
    augment: AugmentSettings = doc(help="this group's augmentation, over data.augment", factory=AugmentSettings)


@dataclass
class DataConfig:
    """The training data, its loader backend and the views made from it."""

    path: str = doc("", "image folder, .npz JPEG collection or converted dataset (dali/ffcv need a converted one)")
    split: str = doc("train", "the split of data.path to train on")
    test_path: str = doc("", "the kNN monitor's test set (empty: the monitor is off)")
    test_split: str = doc("test", "the split of test_path")
    backend: str = field(default="torch", metadata={
        "choices": backend_names,
        "help": "loader: a registered backend (viewpipe.pipelines.backends(): the torch reference, PIL + "
                "DataLoader; dali; ffcv; memory, decoded once)"})
    size: int = bounded(32, 1, help="view side in px; also the side of the clean passes (box update, mining, kNN)")
    preset: str = doc("mocov2_small", "augmentation preset (viewpipe.augment.PRESETS); shorthand for "
                                      "data.augment.preset")
    views: int = bounded(2, 1, help="views per sample (each method says how many it takes); without groups")
    multicrop: str = doc("", "shorthand for data.groups: COUNTxSIZE[@MIN-MAX][:nobox],... e.g. "
                             "\"2x224,6x96@0.05-0.2\"; replaces data.views")
    crop: CropSettings = doc(help="crop sampling of every view (a group may change it)", factory=CropSettings)
    augment: AugmentSettings = doc(help="augmentation of every view (a group may change it)",
                                   factory=AugmentSettings)
    groups: list[GroupSettings] = doc(
        help="multi-crop view groups in order, e.g. [{count: 2, size: 224}, {count: 6, size: 96, scale: [0.05, "
             "0.2], box: false}]; replaces data.views ([]: data.views views)", factory=list)
    batch_size: int = bounded(512, 1, help="GLOBAL batch: divided among the ranks (each device gets "
                                           "batch_size / world size)")
    workers: int = bounded(0, 0, factory=cpu_cores,
                           help="loader processes/threads per rank (default: the CPU cores; capped at them)")
    hw_decoder_load: float = bounded(0.65, 0.0, 1.0, help="dali only: the share of images nvJPEG sends to the "
                                     "hardware JPEG decoder (A100, H100), the rest decoded by CUDA")


@dataclass
class CCropConfig:
    """ContrastiveCrop (Peng et al., CVPR 2022; `trainers/ccrop.py`): plain RandomResizedCrop until the first box
    update, which runs after epoch `warmup`, then after every epoch e with e % interval == 0 (never after the
    last); epochs counted from 1, as the release counts them (the log counts from 0)."""

    enabled: bool = doc(True, "ContrastiveCrop boxes on (false: plain RandomResizedCrop)")
    alpha: float = bounded(0.1, 0.0, lo_open=True, help="Beta(α, α) of the crop centre within the box")
    warmup: int = bounded(100, 0, help="the first box update runs after this epoch (counted from 1)")
    interval: int = bounded(100, 1, help="then a box update after every epoch e with e % interval == 0")
    threshold: float = bounded(0.1, 0.0, 1.0, help="heatmap threshold that makes a box")
    size: int = bounded(0, 0, help="side of the clean images of the box pass (0: data.size)")
    grid: int = bounded(32, 0, help="images in the PNG written after each update (0: none)")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule: linear warm-up, then cosine down to lr × final_lr_ratio."""

    name: str = choice("sgd", "lars", "adamw", help="optimizer")
    lr: float = bounded(0.5, 0.0, help="peak learning rate (for the global batch)")
    momentum: float = bounded(0.9, 0.0, 1.0, hi_open=True, help="sgd/lars momentum")
    weight_decay: float = bounded(1e-4, 0.0, help="weight decay")
    betas: tuple[float, float] = bounded((0.9, 0.999), 0.0, 1.0, hi_open=True, help="adamw betas")
    warmup_epochs: float = bounded(0.0, 0.0, help="linear warm-up epochs")
    final_lr_ratio: float = bounded(0.1, 0.0, help="the cosine ends at lr × this")
    per_epoch: bool = doc(True, "step the cosine once per epoch (the official ContrastiveCrop code), else per step")
    skip_nonfinite: bool = doc(False, "a NaN/inf loss: false stops the run naming the step (the last good "
                                      "checkpoint kept); true skips the update and counts it")


@dataclass
class TrainConfig:
    """A pretraining run. `method_args` go to the method's constructor (see each method's file)."""

    method: str = doc("mocov2", "mocov2, simsiam, csml, snclr")
    backbone: str = doc("resnet18_cifar", "backbone (trainers/models.py), e.g. resnet18_cifar, resnet50, vit_small")
    method_args: dict[str, Any] = doc(help="the method's constructor arguments, e.g. {queue: 4096, tau: 0.2}",
                                      factory=dict)
    backbone_args: dict[str, Any] = doc(help="the backbone constructor's keyword arguments (trainers/models.py)",
                                        factory=dict)
    epochs: int = bounded(500, 1, help="training epochs")
    data: DataConfig = doc(help="training data, loader and views", factory=DataConfig)
    ccrop: CCropConfig = doc(help="ContrastiveCrop boxes", factory=CCropConfig)
    optim: OptimConfig = doc(help="optimizer and schedule", factory=OptimConfig)
    out: str = doc("runs/run", "run folder: checkpoints, log.jsonl, config.yaml (the resolved config)")
    seed: int = bounded(0, 0, help="seed of everything (each rank adds its rank)")
    device: str = choice("auto", "cpu", "cuda", help="auto: cuda when there is a GPU")
    amp: bool = doc(True, "bf16 autocast on the GPU (never on the CPU)")
    channels_last: bool = doc(True, "channels_last memory format for the model and views")
    sync_bn: bool = doc(False, "SyncBatchNorm across ranks")
    knn_every: int = bounded(10, 0, help="epochs between kNN monitor runs (0: off); also after the last epoch")
    knn_k: int = bounded(200, 1, help="kNN monitor: neighbours")
    knn_t: float = bounded(0.1, 0.0, lo_open=True, help="kNN monitor: temperature")
    log_every: int = bounded(20, 1, help="steps between log lines")
    save_every: int = bounded(0, 0, help="steps between mid-epoch checkpoints (0: at the end of each epoch only)")
    max_steps: int = bounded(0, 0, help="stop after this many steps of this process (0: no limit)")


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


# ------------------------------------------------------------------------------------------------ checking
def _at(label: str, path: str) -> str:
    """Where a message points: `c.yaml.optim.lr` for a file or "config", `override X: optim.lr` for an override."""
    if label.startswith("override "):
        return f"{label}: {path}" if path else label
    return f"{label}.{path}" if path else label


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _type_name(tp: Any) -> str:
    """A field's type as --help-config and the errors write it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return "list of mappings" if dataclasses.is_dataclass(args[0]) else f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, label: str, path: str) -> Any:
    """`value` (from YAML or an override) as type `tp`, or a one-line error naming `path`. Interpolations
    (`${...}`) pass: they are checked once resolved."""
    origin = typing.get_origin(tp)
    where = _at(label, path)
    if _is_interpolation(value):
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ViewpipeError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, label, path)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        return _coerce(value, args[0], label, path) if len(args) == 1 else value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ViewpipeError(f"{where}: expected a list {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, args[0] if args else Any, label, path) for v in value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ViewpipeError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, label, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ViewpipeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
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
    raise ViewpipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type, values: dict, label: str, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - set(fields))
    if unknown:
        what = f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}" + (f" in {path}" if path else "")
        raise ViewpipeError(f"{label}: {what}; known: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(v, hints[k], label, _join(path, k)) for k, v in values.items()})


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
    (lo_open, hi_open) from `bounded` (for a tuple, every element, and min <= max when `ordered`), `choices`
    from `choice`. None (an optional field left unset) passes."""
    if value is None:
        return
    if "choices" in f.metadata and value not in (known := choices_of(f)):
        raise ViewpipeError(f"{where}: expected one of {', '.join(known)}, got {value!r}")
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        lo_open, hi_open = f.metadata.get("open", (False, False))
        integer = f.metadata.get("integer", isinstance(f.default, int) and not isinstance(f.default, bool))
        for v in value if isinstance(value, tuple) else (value,):
            _check_number(v, lo, hi, lo_open, hi_open, integer, where)
        if f.metadata.get("ordered") and isinstance(value, tuple) and value[0] > value[-1]:
            raise ViewpipeError(f"{where}: expected [min, max] with min <= max, got {list(value)}")


def _check_fields(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{where}.{f.name}")
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                _check_fields(v, f"{where}.{f.name}[{i}]")
        else:
            _check_field(value, f, f"{where}.{f.name}")


def _check_presets(d: DataConfig, where: str) -> None:
    from viewpipe.augment import PRESETS

    named = [("data.preset", d.preset), ("data.augment.preset", d.augment.preset)]
    named += [(f"data.groups[{i}].augment.preset", g.augment.preset) for i, g in enumerate(d.groups)]
    for key, name in named:
        if name is not None and name not in PRESETS:
            raise ViewpipeError(f"{where}.{key}: expected one of {', '.join(PRESETS)}, got {name!r}")


def validate(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """`cfg` when every value is in range (the `bounded` and `choice` fields, the method's views, the
    method_args whose range is known, the augmentation presets), or a one-line ViewpipeError naming the first
    offending key as written (`config.optim.lr: expected a number >= 0, got -0.1`; `where` is the config file,
    or "config"). What depends on the data or the ranks (batch size against the dataset, divisibility) is
    checked by the Trainer before training."""
    _check_fields(cfg, where)
    _check_presets(cfg.data, where)
    from viewpipe.trainers.base import METHODS  # (the registry: its classes say how many views they take)

    lo, hi = METHODS[cfg.method].views if cfg.method in METHODS else (2, None)
    views, key = cfg.data.views, "views"
    if cfg.data.groups and cfg.data.multicrop:
        raise ViewpipeError(f"{where}.data.groups: data.multicrop is set too; give the view groups one way "
                            "(data.multicrop: \"\" or data.groups: [])")
    if cfg.data.groups:
        views, key = sum(g.count for g in cfg.data.groups), "groups"
    elif cfg.data.multicrop:
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


# ------------------------------------------------------------------------------------------------ overrides
def _scalar(text: str) -> Any:
    """One value as YAML reads it (0.3, true, null, text); text YAML cannot read stays text."""
    import yaml

    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class _Flow:
    """A recursive-descent reader of an override's `{key: value, ...}` / `[a, b]` value, where a colon needs no
    space after it (`{queue:1024}`, which YAML would read as one key) and `${...}` stays one value."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def fail(self, what: str) -> ViewpipeError:
        return ViewpipeError(f"cannot read {self.s!r}: {what} at character {self.i + 1}; e.g. {{queue: 1024, "
                             "tau: 0.2}} or [0.2, 1.0]")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self, stops: str) -> str:
        """Text up to one of `stops` outside quotes and `${...}`."""
        start, depth, s = self.i, 0, self.s
        while self.i < len(s):
            c = s[self.i]
            if c in "'\"" and depth == 0:
                end = s.find(c, self.i + 1)
                if end < 0:
                    raise self.fail("unclosed quote")
                self.i = end + 1
                continue
            if s.startswith("${", self.i):
                depth += 1
                self.i += 2
                continue
            if c == "}" and depth:
                depth -= 1
            elif c in stops and depth == 0:
                break
            self.i += 1
        return s[start:self.i].strip()

    def value(self) -> Any:
        c = self.peek()
        if c in ("{", "["):
            close = "}" if c == "{" else "]"
            self.i += 1
            out: Any = {} if c == "{" else []
            while True:
                if self.peek() == close:
                    self.i += 1
                    return out
                if c == "{":
                    key = self.token(":,}")
                    if self.peek() != ":":
                        raise self.fail("expected 'key: value'")
                    self.i += 1
                    out[key.strip("'\"") if key[:1] in "'\"" else key] = self.value()
                else:
                    out.append(self.value())
                nxt = self.peek()
                if nxt == ",":
                    self.i += 1
                elif nxt != close:
                    raise self.fail(f"expected ',' or '{close}'")
        text = self.token(",]}")
        return None if text == "" else _scalar(text)

    def read(self) -> Any:
        out = self.value()
        if self.peek():
            raise self.fail("unexpected text")
        return out


def parse_value(raw: str) -> Any:
    """An override's value: YAML scalars (0.3, true, null, text), and flow mappings and lists whose colons need
    no space (`{queue:1024, tau: 0.2}`, `[0.2, 1]`), nested; `${...}` interpolations kept for OmegaConf."""
    text = raw.strip()
    return _Flow(text).read() if text[:1] in ("{", "[") else _scalar(raw)


def key_path(key: str, item: str) -> list[str | int]:
    """An override's key as its steps: `data.groups[1].size` (or `data.groups.1.size`) is
    ["data", "groups", 1, "size"]."""
    steps: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        indices = rest[:-1].split("][") if rest else []
        if (not name and not (steps and indices)) or (rest and not rest.endswith("]")) \
                or any(not i.isdigit() for i in indices):
            raise ViewpipeError(f"override {item!r}: expected key=value, e.g. optim.lr=0.3 or "
                                f"data.groups[1].size=96")
        if name:
            steps.append(int(name) if name.isdigit() else name)
        steps += [int(i) for i in indices]
    return steps


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """`a.b.c=value` as its key's steps (`key_path`) and its value (`parse_value`)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ViewpipeError(f"override {item!r}: expected key=value, e.g. optim.lr=0.3")
    steps = key_path(key, item)
    if isinstance(steps[0], int):
        raise ViewpipeError(f"override {item!r}: a key starts with a name, e.g. data.groups[1].size=96")
    try:
        value = parse_value(raw)
    except ViewpipeError as exc:
        raise ViewpipeError(f"override {item}: {exc}") from None
    return steps, value


def _nest(steps: list[str], value: Any) -> dict:
    """{a: {b: {c: value}}} for steps [a, b, c]."""
    for step in reversed(steps):
        value = {step: value}
    return value


def _lists(value: Any) -> Any:
    """`value` with every tuple (OmegaConf's tuple fields) turned into a list, so that an entry can be set."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _set_in(container: Any, steps: list[str | int], value: Any, item: str, where: str) -> None:
    """`value` put at `steps` inside the plain `container` (lists and mappings); an index beyond a list is
    one line naming the override and the list's length."""
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(step, int):
            if not isinstance(container, list):
                raise ViewpipeError(f"override {item}: {where} is not a list")
            if step >= len(container):
                raise ViewpipeError(f"override {item}: {where} has {len(container)} entr"
                                    f"{'y' if len(container) == 1 else 'ies'} (indices from 0)"
                                    + (f"; give the whole list: {where}=[...]" if not container else ""))
        elif not isinstance(container, dict):
            raise ViewpipeError(f"override {item}: {where} is not a section or mapping")
        if last:
            container[step] = value
            return
        if isinstance(step, str) and container.get(step) is None:
            container[step] = {}
        container, where = container[step], f"{where}[{step}]" if isinstance(step, int) else f"{where}.{step}"


# ------------------------------------------------------------------------------------------------ loading
def config_names() -> list[str]:
    """The configs shipped with viewpipe (the `viewpipe.configs` package data), by name."""
    return sorted(p.name[:-5] for p in _packaged().iterdir() if p.name.endswith(".yaml"))


def _packaged() -> Any:
    from importlib.resources import files

    return files("viewpipe.configs")


def find_config(name: str | os.PathLike[str]) -> Path:
    """A config file: `name` when it is a file, else the shipped config of that name (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent == Path(".") and stem in config_names():
        return Path(str(_packaged() / f"{stem}.yaml"))
    raise ViewpipeError(f"{name}: no such config file, nor a shipped config of that name; shipped: "
                        f"{', '.join(config_names())}")


def _read_yaml(p: Path) -> dict:
    import yaml

    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ViewpipeError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ViewpipeError(f"{p}: expected a mapping of settings at the top level")
    return values


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "msg", "") or exc).strip().splitlines() or [type(exc).__name__])[0]


def _schema_type(key: str) -> Any:
    """The type the schema gives dotted `key` (Any inside a mapping such as method_args)."""
    tp: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return Any
        tp = typing.get_type_hints(tp)[part]
    return tp


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig: the defaults, merged with the YAML file `path` (a path, or a shipped config's name:
    `find_config`), then with each `key=value` override in turn, as OmegaConf structured configs (the
    dataclasses are the schema); `${...}` interpolations resolved; validated (`validate`). Errors name the
    file's key or the override."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = "config"
    layers: list[tuple[str, str | None, Any]] = []  # (label in errors, the override (None: the file), values)
    if path is not None:
        p = find_config(path)
        where = str(path) if Path(path).is_file() else p.name
        layers.append((where, None, _read_yaml(p)))
    layers += [(f"override {item}", item, parse_override(item)) for item in overrides]
    cfg = OmegaConf.structured(TrainConfig)
    for label, item, values in layers:
        key = None
        if item is not None:
            steps, value = values
            first = next((i for i, s in enumerate(steps) if isinstance(s, int)), len(steps))
            names = [str(s) for s in steps[:first]]
            if first < len(steps):  # into a list: the list as it stands with the entry changed replaces it
                current = OmegaConf.select(cfg, ".".join(names))
                if current is None:
                    raise ViewpipeError(f"{label}: {'.'.join(names)} is not a list (or is empty)")
                whole = _lists(OmegaConf.to_container(current) if OmegaConf.is_config(current) else current)
                _set_in(whole, steps[first:], value, item, ".".join(names))
                value = whole
            key, values = ".".join(names), _nest(names, value)
        _from_dict(TrainConfig, values, label, "")  # unknown keys and types, named as the user wrote them
        try:
            empty = {list: [], dict: {}}.get(typing.get_origin(_schema_type(key))) if key else None
            if empty is not None:
                # a list or mapping (method_args) is replaced whole, not merged into; a section merges
                OmegaConf.update(cfg, key, empty, merge=False)
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as exc:
            raise ViewpipeError(f"{_at(label, getattr(exc, 'full_key', '') or '')}: {_first_line(exc)}") from None
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ViewpipeError(f"{_at(where, getattr(exc, 'full_key', '') or '')}: {_first_line(exc)}") from None
    return validate(_from_dict(TrainConfig, resolved, where, ""), where)


def to_dict(cfg: TrainConfig) -> dict:
    """The config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML that `load_config` reads back to an equal config."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, folder: str | os.PathLike[str]) -> Path:
    """`folder/config.yaml`: the resolved config of a run (written whole, then renamed into place)."""
    from viewpipe.formats import write_atomic

    out = Path(folder) / "config.yaml"
    write_atomic(out, to_yaml(cfg))
    return out


# ------------------------------------------------------------------------------------------------ help
def _default_text(f: dataclasses.Field) -> str:
    import json

    if f.default_factory is not _MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return ""
        if f.default_factory is cpu_cores:
            return f"{value} (the cores here)"
    else:
        value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:.6g}" if isinstance(v, float) else json.dumps(v) for v in value) + "]"
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(value)


def _constraint(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return "one of " + ", ".join(choices_of(f))
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        if lo is None and hi is None:
            return ""
        lo_open, hi_open = f.metadata["open"]
        return _describe(lo, hi, lo_open, hi_open, f.metadata.get("integer", False)) + (
            ", min <= max" if f.metadata.get("ordered") else "")
    return ""


def describe(cls: type = TrainConfig) -> list[tuple[str, str, str, str]]:
    """Every key of the config: (key, type, default, help with its allowed values). A section seen before is
    referred to rather than listed again; list items are written `key[]`."""
    rows: list[tuple[str, str, str, str]] = []
    seen: dict[type, str] = {}

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            key, tp = _join(prefix, f.name), hints[f.name]
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            sub = tp if dataclasses.is_dataclass(tp) else item if dataclasses.is_dataclass(item) else None
            text = f.metadata.get("help", "")
            limit = _constraint(f)
            text = f"{text} ({limit})" if limit else text
            if sub is not None:
                known = next((k for t, k in seen.items() if issubclass(t, sub)), None)
                if known is not None:
                    text += f"; the keys of {known}" if sub in seen else f"; the photometric keys of {known}"
                rows.append((key, _type_name(tp), _default_text(f), text))
                if known is None:
                    seen[sub] = key
                    walk(sub, key + ("[]" if item is not None else ""))
            else:
                rows.append((key, _type_name(tp), _default_text(f), text))

    walk(cls, "")
    return rows


def help_config() -> str:
    """`viewpipe pretrain --help-config`: every key, its type, default and meaning, one line each."""
    rows = describe()
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in (0, 1, 2))
    lines = ["Config keys (YAML, or overrides KEY=VALUE; null: inherit, [] / {}: empty). A key's default "
             "comes from the defaults below, then the --config file, then the overrides.", "",
             f"{'KEY':<{w0}}  {'TYPE':<{w1}}  {'DEFAULT':<{w2}}  MEANING"]
    for key, tp, default, text in rows:
        lines.append(f"{key:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {text}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ loader parts
def build_crop(cfg: TrainConfig, use_box: bool) -> Any:
    """The loader's crop sampling (viewpipe.crop.CropConfig) from data.crop and ccrop.alpha."""
    from viewpipe.crop import CropConfig

    c = cfg.data.crop
    return CropConfig(alpha=cfg.ccrop.alpha, scale=tuple(c.scale), ratio=tuple(c.ratio), tries=c.tries,
                      use_box=use_box)


_PHOTOMETRIC = [f.name for f in dataclasses.fields(ViewAugmentSettings)]


def build_augment(d: DataConfig, group: GroupSettings | None = None, size: int = 0) -> Any:
    """The augmentation (viewpipe.augment.AugmentConfig) of data's views, or of one group's: the preset (the
    group's, else data.augment's, else data.preset), then data.augment's settings, then the group's."""
    from dataclasses import replace

    from viewpipe.augment import preset

    layers = [d.augment] + ([group.augment] if group is not None else [])
    name = next((a.preset for a in reversed(layers) if a.preset is not None), d.preset)
    aug = preset(name, size=size or d.size)
    views = list(aug.views)
    for a in layers:
        common = {k: getattr(a, k) for k in _PHOTOMETRIC if getattr(a, k) is not None}
        views = [replace(v, **common) for v in views]
        if a.views:
            n = max(len(views), len(a.views))
            views = [replace(views[i % len(views)], **{k: getattr(a.views[i % len(a.views)], k) for k in _PHOTOMETRIC
                                                       if getattr(a.views[i % len(a.views)], k) is not None})
                     for i in range(n)]
        for k in ("mean", "std", "blur_kernel"):
            if getattr(a, k) is not None:
                aug = replace(aug, **{k: getattr(a, k)})
    return replace(aug, views=tuple(views))


def build_groups(d: DataConfig) -> tuple:
    """The loader's view groups (viewpipe.pipelines.ViewGroup): data.groups, each with its own crop and
    augmentation, or the data.multicrop shorthand, or () (data.views views of data.size)."""
    from viewpipe.pipelines import ViewGroup, parse_views

    if d.groups:
        c = d.crop
        return tuple(ViewGroup(g.count, g.size or d.size, tuple(g.scale or c.scale), g.box,
                               ratio=tuple(g.ratio or c.ratio), tries=g.tries or c.tries,
                               augment=build_augment(d, g, g.size or d.size)) for g in d.groups)
    if d.multicrop:
        return parse_views(d.multicrop, tuple(d.crop.scale))
    return ()
