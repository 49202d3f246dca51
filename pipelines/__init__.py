"""Loader backends (installed as `viewpipe.pipelines`): each turns a dataset plus the live SampleState
into batches of augmented views. `torch` is the PIL + DataLoader reference every benchmark compares against."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from viewpipe.augment import AugmentConfig, preset
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError


@dataclass
class LoaderConfig:
    """What every backend is asked for: views per image, batch, crop sampling and augmentation."""

    views: int = 2
    batch_size: int = 256
    crop: CropConfig = field(default_factory=CropConfig)
    augment: AugmentConfig = field(default_factory=lambda: preset("mocov2"))
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0


# name -> "module:function" building a loader as f(source, cfg, state, ...); imported on first use.
BACKENDS: dict[str, str] = {
    "torch": "viewpipe.pipelines.reference:reference_loader",
    "dali": "viewpipe.pipelines.dali:dali_loader",
}


def get_backend(name: str) -> Callable[..., Any]:
    """The loader factory of backend `name`."""
    if name not in BACKENDS:
        raise ViewpipeError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    module, func = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), func)
