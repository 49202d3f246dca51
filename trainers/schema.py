"""The pretraining config's schema: the dataclasses OmegaConf builds its structured config from, each field
with its `--help-config` line and the range `validation.validate` checks (`bounded`, `choice`, `doc`). The
sections that set a core object's keys take those keys' value types and defaults from the core dataclass
(`schema_of`: viewpipe.crop.CropConfig, viewpipe.augment.ViewAugment and AugmentConfig,
viewpipe.pipelines.ViewGroup), so that a key the core adds or drops is an error here at import, not a silent
mirror; null in an optional key keeps the value it inherits."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from viewpipe.augment import AugmentConfig, ViewAugment
from viewpipe.crop import CropConfig
from viewpipe.pipelines import ViewGroup

_MISSING = dataclasses.MISSING


def bounded(default: Any = _MISSING, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False, help: str = "", ordered: bool = False, integer: bool | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A numeric field whose values must lie between `lo` and `hi` (None: unbounded; inclusive unless
    `lo_open`/`hi_open`); for a tuple field, every element (`ordered`: and min <= max). NaN and infinities are
    always refused; None passes (an optional field). Checked by `validate`, with the field's name as the user
    wrote it. `help`: the key's line in `--help-config`; `factory`: a default computed when the config is made;
    no default: the core's (`schema_of`)."""
    meta = {"range": (lo, hi), "open": (lo_open, hi_open), "help": help, "ordered": ordered,
            "integer": integer}
    if integer is None and default is not _MISSING:
        meta["integer"] = isinstance(default, int) and not isinstance(default, bool)
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


def local_ranks() -> int:
    """The ranks on this node: torchrun's LOCAL_WORLD_SIZE (1 without torchrun, or when it is not a number)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def effective_workers(workers: int) -> int:
    """`data.workers` of one rank, capped at its share of the node's cores (the cores // LOCAL_WORLD_SIZE, at
    least 1): the ranks of a node share its cores, and more loader processes or DALI/FFCV threads than cores
    only compete. The default (the cores) is thus the share; 0 stays 0 (no workers)."""
    return min(workers, max(1, cpu_cores() // local_ranks()))


def workers_line(workers: int) -> str:
    """The line a run prints once at its start: the loader workers of each rank and where they come from."""
    if workers <= 0:
        return "data: no loader workers: batches are read in the main process (data.workers=0)"
    n, cores, ranks = effective_workers(workers), cpu_cores(), local_ranks()
    if ranks == 1:
        return f"data: {n} workers ({cores} cores, 1 rank on this node)"
    return f"data: {n} workers per rank ({cores} cores / {ranks} ranks on this node)"


def schema_of(core: type, name: str, doc: str, *, optional: bool = False, omit: tuple[str, ...] = (),
              bases: tuple[type, ...] = (), **keys: Any) -> type:
    """A schema dataclass `name` for the keys of the core dataclass `core`, in the order of `keys`: each a field
    (`bounded`, `doc`) whose value type is the core's and whose default, when it gives none, is the core's
    (None when `optional`: every value may then be null, "keep what is inherited"); or a (type, field) pair
    for a key the schema types itself (its own key, or one that means more here). Every key of `core` is
    given or named in `omit`.

    The core dataclasses cannot be the schema themselves: they are frozen, and OmegaConf 2.3 makes a frozen
    dataclass's node read-only, so that no file or override could set its keys (2.4 merges into it); and they
    have no null for "inherit" nor the keys that the run sets elsewhere (CropConfig's alpha is ccrop.alpha)."""
    hints, defaults = typing.get_type_hints(core), {f.name: f.default for f in dataclasses.fields(core)}
    left = set(hints) - set(keys) - set(omit)
    if left:
        raise TypeError(f"{name}: {core.__name__}'s keys {sorted(left)} are neither in the schema nor omitted")
    spec = []
    for key, given in keys.items():
        tp, f = given if isinstance(given, tuple) else (hints[key] | None if optional else hints[key], given)
        meta = dict(f.metadata)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            spec.append((key, tp, f))
            continue
        if "range" in meta and meta["integer"] is None:
            meta["integer"] = int in (hints[key], *typing.get_args(hints[key]))
        spec.append((key, tp, field(default=None if optional else defaults[key], metadata=meta)))
    return dataclasses.make_dataclass(name, spec, bases=bases, namespace={"__doc__": doc, "__module__": __name__})



CropSettings = schema_of(
    CropConfig, "CropSettings", "RandomResizedCrop's sampling of every view's window (viewpipe.crop.CropConfig; "
    "its alpha, the Beta of the box-centred crops, is ccrop.alpha, and use_box the engine's, per epoch).",
    omit=("alpha", "use_box"),
    scale=bounded(lo=0.0, hi=1.0, lo_open=True, ordered=True,
                  help="[min, max] area of a crop as a fraction of the image's"),
    ratio=bounded(lo=0.0, lo_open=True, ordered=True, help="[min, max] aspect ratio (width / height) of a crop"),
    tries=bounded(lo=1, help="draws before falling back to a centred crop of the clamped ratio"))

ViewAugmentSettings = schema_of(
    ViewAugment, "ViewAugmentSettings", "Photometric settings of a view (viewpipe.augment.ViewAugment); null: "
    "keep the preset's.", optional=True,
    flip=bounded(lo=0.0, hi=1.0, help="probability of a horizontal flip"),
    jitter=bounded(lo=0.0, help="colour jitter strengths [brightness, contrast, saturation, hue]"),
    jitter_p=bounded(lo=0.0, hi=1.0, help="probability of the colour jitter"),
    grayscale=bounded(lo=0.0, hi=1.0, help="probability of grayscale"),
    blur=bounded(lo=0.0, hi=1.0, help="probability of a Gaussian blur"),
    blur_sigma=bounded(lo=0.0, lo_open=True, ordered=True, help="[min, max] σ of the blur"),
    solarize=bounded(lo=0.0, hi=1.0, help="probability of solarization"),
    solarize_threshold=bounded(lo=0.0, hi=1.0, help="solarize the values above this (images in [0, 1])"))

AugmentSettings = schema_of(
    AugmentConfig, "AugmentSettings", "A view group's augmentation (viewpipe.augment.AugmentConfig): a preset "
    "(viewpipe.augment.PRESETS) with any of its settings changed; the photometric keys apply to every view, "
    "`views` to one view each. null everywhere: inherit (data.preset, then data.augment, then the group's own).",
    optional=True, omit=("size",), bases=(ViewAugmentSettings,),  # size: the group's, or data.size
    preset=(str | None, doc(None, "augmentation preset (mocov2, mocov2_small, simclr, byol); null: data.preset")),
    views=(list[ViewAugmentSettings], doc(
        help="per-view settings over the preset's, view v taking entry v % len (e.g. BYOL's asymmetric pair); "
             "[]: none", factory=list)),
    mean=bounded(help="normalisation mean per channel"),
    std=bounded(lo=0.0, lo_open=True, help="normalisation std per channel"),
    blur_kernel=bounded(lo=0, help="odd blur kernel side; 0: about 10% of the size"))


# the loader's ViewGroup, but its own keys: `box` (the user's name of use_box), size 0 and scale null (data's),
# and an augmentation over data.augment; clean views (`clean`, `resize`) are the whole-dataset passes', not training's
GroupSettings = schema_of(
    ViewGroup, "GroupSettings", "One multi-crop view group: `count` views of `size` px, their own crop and "
    "augmentation (null: data's).", omit=("use_box", "clean", "resize"),
    count=bounded(lo=1, help="views of each image in this group"),
    size=bounded(0, 0, help="the views' side in px (0: data.size)"),
    scale=(tuple[float, float] | None, bounded(None, 0.0, 1.0, lo_open=True, ordered=True,
                                               help="crop area range (null: data.crop.scale)")),
    ratio=bounded(lo=0.0, lo_open=True, ordered=True, help="crop aspect-ratio range (null: data.crop.ratio)"),
    tries=bounded(lo=1, help="crop draws (null: data.crop.tries)"),
    box=(bool, doc(True, "centre the crops in the ContrastiveCrop boxes (when the run uses boxes)")),
    centres=(str, choice("box", "heatmap", help="where the group's crop centres come from when the run uses boxes: "
                         "box (ContrastiveCrop's Beta inside the box) or heatmap (drawn from each sample's live "
                         "heatmap mass, beyond the paper)")),
    augment=(AugmentSettings, doc(help="this group's augmentation, over data.augment", factory=AugmentSettings)))


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
    multicrop: str = doc("", "shorthand for data.groups: COUNTxSIZE[@MIN-MAX][:nobox|:heatmap],... e.g. "
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
                           help="loader processes/threads per rank (default: the rank's share of the node's CPU cores, "
                                "cores // LOCAL_WORLD_SIZE; capped at it)")
    hw_decoder_load: float = bounded(0.65, 0.0, 1.0, help="dali only: the share of images nvJPEG sends to the "
                                     "hardware JPEG decoder (A100, H100), the rest decoded by CUDA")
    dali_plan_ahead: int = bounded(0, 0, help="dali only: batches a thread plans and reads ahead of DALI's callback "
                                   "(0: in the callback, on the training thread; DaliOptions.plan_ahead)")


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
class WandbConfig:
    """Weights & Biases (`logger=wandb`; `pip install viewpipe[wandb]`): where the run goes and how."""

    project: str = doc("viewpipe", "W&B project")
    entity: str = doc("", "W&B entity (user or team; empty: your default)")
    name: str = doc("", "W&B run name (empty: the run folder's name)")
    mode: str = choice("auto", "online", "offline", "disabled", help="online, offline (files under OUT/wandb, "
                       "wandb sync uploads them), disabled; auto: WANDB_MODE, else online")
    tags: list[str] = doc(help="W&B run tags", factory=list)


@dataclass
class TrainConfig:
    """A pretraining run. `method_args` go to the method's constructor (see each method's file)."""

    method: str = doc("mocov2", "a registered method (trainers/base.py METHODS); its arguments: method_args below")
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
    dist_timeout_s: float = bounded(300.0, 0.0, lo_open=True, help="several ranks: seconds a collective waits for "
                                    "the others before the run stops naming the lost rank (torchrun)")
    knn_every: int = bounded(10, 0, help="epochs between kNN monitor runs (0: off); also after the last epoch")
    knn_k: int = bounded(200, 1, help="kNN monitor: neighbours")
    knn_t: float = bounded(0.1, 0.0, lo_open=True, help="kNN monitor: temperature")
    log_every: int = bounded(20, 1, help="steps between log lines")
    logger: str = doc("tensorboard", "where the scalars, box grids and kNN curve go besides log.jsonl: tensorboard, "
                                     "wandb, or both comma-separated (tensorboard,wandb); none: log.jsonl only")
    wandb: WandbConfig = doc(help="Weights & Biases, for logger=wandb", factory=WandbConfig)
    save_every: int = bounded(0, 0, help="steps between mid-epoch checkpoints (0: at the end of each epoch only)")
    max_steps: int = bounded(0, 0, help="stop after this many steps of this process (0: no limit)")
