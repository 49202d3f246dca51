"""The config's checks, each a one-line ViewpipeError naming the key as the user wrote it (`c.yaml.optim.lr`,
`override optim.lr=x: optim.lr`): `check_keys` reads plain values (a YAML file, an override, the resolved
config) into the schema's dataclasses, refusing unknown keys and badly typed values (`${...}` passes until it
is resolved); `validate` refuses values out of range (the `bounded` and `choice` fields, the method's number
of views, the method_args whose range is known, the augmentation presets)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.loggers import check_logger_spec
from viewpipe.trainers.schema import DataConfig, TrainConfig, choices_of

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



def at(label: str, path: str) -> str:
    """Where a message points: `c.yaml.optim.lr` for a file or "config", `override X: optim.lr` for an override."""
    if label.startswith("override "):
        return f"{label}: {path}" if path else label
    return f"{label}.{path}" if path else label


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def type_name(tp: Any) -> str:
    """A field's type as --help-config and the errors write it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is list:
        return "list of mappings" if dataclasses.is_dataclass(args[0]) else f"list of {type_name(args[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, label: str, path: str) -> Any:
    """`value` (from YAML or an override) as type `tp`, or a one-line error naming `path`. Interpolations
    (`${...}`) pass: they are checked once resolved."""
    origin = typing.get_origin(tp)
    where = at(label, path)
    if _is_interpolation(value):
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ViewpipeError(f"{where}: expected a mapping, got {value!r}")
        return check_keys(tp, value, label, path)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        return _coerce(value, args[0], label, path) if len(args) == 1 else value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ViewpipeError(f"{where}: expected a list {type_name(tp)}, got {value!r}")
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
    raise ViewpipeError(f"{where}: expected {type_name(tp)}, got {value!r}")


def check_keys(cls: type, values: dict, label: str, path: str = "") -> Any:
    """`values` (plain data) as an instance of the schema dataclass `cls`, or a one-line error naming the key
    (`path`, under the file or override `label`) that is unknown or badly typed."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - set(fields))
    if unknown:
        what = f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}" + (f" in {path}" if path else "")
        raise ViewpipeError(f"{label}: {what}; known: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(v, hints[k], label, join_key(path, k)) for k, v in values.items()})


def describe_range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, integer: bool) -> str:
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
        raise ViewpipeError(f"{where}: expected {describe_range(lo, hi, lo_open, hi_open, integer)}, got {value!r}")


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


def _check_views(cfg: TrainConfig, where: str) -> None:
    """The views of each sample (data.groups, data.multicrop or data.views) as many as the method takes."""
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


def validate(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """`cfg` when every value is in range (the `bounded` and `choice` fields, the method's views, the
    method_args whose range is known, the augmentation presets, the loggers), or a one-line ViewpipeError
    naming the first offending key as written (`config.optim.lr: expected a number >= 0, got -0.1`; `where` is
    the config file, or "config"). What depends on the data or the ranks (batch size against the dataset,
    divisibility) is checked by the Trainer before training."""
    _check_fields(cfg, where)
    _check_presets(cfg.data, where)
    _check_views(cfg, where)
    check_logger_spec(cfg.logger, f"{where}.logger")
    if not isinstance(cfg.method_args, dict):
        raise ViewpipeError(f"{where}.method_args: expected a mapping, got {cfg.method_args!r}")
    for key, value in cfg.method_args.items():
        if key in METHOD_ARG_RANGES:
            _check_number(value, *METHOD_ARG_RANGES[key], f"{where}.method_args.{key}")
    return cfg
