"""viewpipe: contrastive-learning views at GPU speed — the core, importable without DALI or FFCV.

- `viewpipe.state.SampleState`: per-sample boxes, heatmaps and neighbours in shared memory, read live by loaders.
- `viewpipe.crop`: the ContrastiveCrop window sampler (NumPy, vectorised over a batch).
- `viewpipe.boxes`: heatmap → box, the ContrastiveCrop box update.
- `viewpipe.augment`: batched crop-resize and photometric augmentation (`Augmenter`): fused Triton kernels on
  the GPU, torch ops (`viewpipe.torch_ops`) on the CPU, the same views from the same seed.
- `viewpipe.convert`: folders and `.npz` collections to DALI shards and an FFCV file; `viewpipe.verify` checks them.
- `viewpipe.sources`: image folders and `.npz` JPEG collections addressed by sample index.

The front door, importable from `viewpipe` itself (each name is imported on first use, so `import viewpipe`
stays light): `make_loader` (a backend's loader of a dataset in one call, yielding `Batch`), `Augmenter` and
`ViewTransform` (the augmentation alone, batched or per sample), `preset`, `CropConfig`, `LoaderConfig`,
`ViewGroup`, `SampleState`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # name → the module that defines it
    "make_loader": "viewpipe.pipelines.base", "Batch": "viewpipe.pipelines.base", "Loader": "viewpipe.pipelines.base",
    "get_backend": "viewpipe.pipelines.base", "backends": "viewpipe.pipelines.base",
    "LoaderConfig": "viewpipe.pipelines.config", "ViewGroup": "viewpipe.pipelines.config",
    "Augmenter": "viewpipe.augment", "AugmentConfig": "viewpipe.augment_params", "preset": "viewpipe.augment_params",
    "ViewTransform": "viewpipe.transforms", "CropConfig": "viewpipe.crop", "CropSampler": "viewpipe.crop",
    "SampleState": "viewpipe.state",
}
__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from viewpipe.augment import Augmenter
    from viewpipe.augment_params import AugmentConfig, preset
    from viewpipe.crop import CropConfig, CropSampler
    from viewpipe.pipelines.base import Batch, Loader, backends, get_backend, make_loader
    from viewpipe.pipelines.config import LoaderConfig, ViewGroup
    from viewpipe.state import SampleState
    from viewpipe.transforms import ViewTransform


def __getattr__(name: str) -> Any:
    """The front door's names, imported when first used (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'viewpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
