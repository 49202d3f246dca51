"""The pretraining config, loaded: the schema's defaults (`trainers/schema.py`), merged with a YAML file (a path,
or the name of a config shipped with viewpipe) and then with each `key=value` override in turn
(`trainers/overrides.py`), as OmegaConf structured configs; `${...}` interpolations resolved once every layer
is merged; then checked (`trainers/validation.py`), each error one line naming the file's key or the override.
Also the run's config.yaml, and the translators from the config into the loader's settings (`build_crop`,
`build_augment`, `build_groups`). The config's public names are importable from here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.confighelp import help_config
from viewpipe.trainers.overrides import clear_replaced, override_values, parse_override
from viewpipe.trainers.schema import (AugmentSettings, CCropConfig, CropSettings, DataConfig, GroupSettings,
                                      OptimConfig, TrainConfig, ViewAugmentSettings, cpu_cores, effective_workers,
                                      workers_line)
from viewpipe.trainers.validation import at, check_keys, validate

__all__ = ["AugmentSettings", "CCropConfig", "CropSettings", "DataConfig", "GroupSettings", "OptimConfig",
           "TrainConfig", "ViewAugmentSettings", "build_augment", "build_crop", "build_groups", "config_names",
           "cpu_cores", "effective_workers", "find_config", "help_config", "load_config", "save_config",
           "to_dict", "to_yaml", "validate", "workers_line"]


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


def _file_layer(path: str | os.PathLike[str] | None) -> tuple[str, dict]:
    """The config file's name as errors write it, and its values ("config" and none without a file)."""
    if path is None:
        return "config", {}
    p = find_config(path)
    return str(path) if Path(path).is_file() else p.name, _read_yaml(p)


def _merge(cfg: Any, label: str, values: dict, key: str | None = None) -> Any:
    """`cfg` with the plain `values` of one layer merged in (a file's, or the override of `key`), after their keys
    and types are checked against the schema; errors name the layer `label`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    check_keys(TrainConfig, values, label)  # unknown keys and types, named as the user wrote them
    try:
        if key:
            clear_replaced(cfg, key)
        return OmegaConf.merge(cfg, values)
    except OmegaConfBaseException as exc:
        raise ViewpipeError(f"{at(label, getattr(exc, 'full_key', '') or '')}: {_first_line(exc)}") from None


REQUIRED = "???"  # OmegaConf's mandatory value: a config file's key that the user must set (data.path=...)


def required_keys(values: dict, prefix: str = "") -> list[str]:
    """The dotted keys a config file's `values` set to `???`: keys its user must give (`key=value`)."""
    found = []
    for k, v in values.items():
        if isinstance(v, dict):
            found += required_keys(v, f"{prefix}{k}.")
        elif v == REQUIRED:
            found.append(f"{prefix}{k}")
    return found


def _mark_required(cfg: Any, keys: list[str]) -> Any:
    """`cfg` with each of `keys` unset (OmegaConf's merge keeps a default over `???`, so it is set here)."""
    from omegaconf import OmegaConf

    for key in keys:
        OmegaConf.update(cfg, key, REQUIRED)
    return cfg


def _resolved(cfg: Any, where: str) -> dict:
    """The merged config as plain data, its `${...}` interpolations resolved; a required key left unset is one
    line naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", "") or "a key"
        raise ViewpipeError(f"{where}: {key} is not set; add {key}=... to the command line (the config's "
                            f"comments say what it takes)") from None
    except OmegaConfBaseException as exc:
        raise ViewpipeError(f"{at(where, getattr(exc, 'full_key', '') or '')}: {_first_line(exc)}") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig: the defaults, merged with the YAML file `path` (a path, or a shipped config's name:
    `find_config`), then with each `key=value` override in turn, as OmegaConf structured configs (the
    dataclasses are the schema); `${...}` interpolations resolved; validated (`validate`). A file's `???` value
    is a key the overrides must set. Errors name the file's key or the override."""
    from omegaconf import OmegaConf

    where, values = _file_layer(path)
    parsed = [(item, *parse_override(item)) for item in overrides]  # every layer read before any is merged
    cfg = _mark_required(_merge(OmegaConf.structured(TrainConfig), where, values), required_keys(values))
    for item, steps, value in parsed:
        key, values = override_values(cfg, steps, value, item)
        cfg = _merge(cfg, f"override {item}", values, key)
    return validate(check_keys(TrainConfig, _resolved(cfg, where), where), where)


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



# ------------------------------------------------------------------------------------------------ loader parts
def build_crop(cfg: TrainConfig, use_box: bool) -> Any:
    """The loader's crop sampling (viewpipe.crop.CropConfig) from data.crop and ccrop.alpha."""
    from viewpipe.crop import CropConfig

    c = cfg.data.crop
    return CropConfig(alpha=cfg.ccrop.alpha, scale=tuple(c.scale), ratio=tuple(c.ratio), tries=c.tries,
                      use_box=use_box)


_PHOTOMETRIC = [f.name for f in dataclasses.fields(ViewAugmentSettings)]  # viewpipe.augment.ViewAugment's keys


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
                               ratio=tuple(g.ratio or c.ratio), tries=g.tries or c.tries, centres=g.centres,
                               augment=build_augment(d, g, g.size or d.size)) for g in d.groups)
    if d.multicrop:
        return parse_views(d.multicrop, tuple(d.crop.scale))
    return ()
