"""What a loader is asked for (`LoaderConfig`): the views in groups (`ViewGroup`, `parse_views`' multi-crop
shorthand), batching, crop sampling, augmentation, device, and each backend's own settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from viewpipe.augment import AugmentConfig, preset
from viewpipe.crop import CropConfig
from viewpipe.errors import ViewpipeError


CENTRES = ("box", "heatmap")  # a view group's crop centres: ContrastiveCrop's box sampler, or the heatmap's mass


@dataclass(frozen=True)
class ViewGroup:
    """Views of one kind (multi-crop): `count` crops per image resized to `size`, their area drawn from
    `scale`; `use_box`: centred by the ContrastiveCrop boxes (when the loader uses boxes at all). `ratio`,
    `tries` and `augment` (its size is the group's): the group's own, None: the loader's `crop` and `augment`.
    `clean`: no random crop but the whole image, as a pass over the whole dataset reads it: size×size ignoring
    the aspect ratio, or with `resize` > 0 the centre size×size of the image whose shorter side is resized to
    `resize` (torchvision's Resize + CenterCrop, the linear-probe protocol's test transform).
    `centres`: where a box-using group's crop centres come from: "box", ContrastiveCrop's (Beta inside the
    box, the official sampler), or "heatmap", drawn from the sample's live heatmap mass
    (`viewpipe.crop.heatmap_windows`; the box sampler while no heatmaps are published)."""

    count: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    use_box: bool = True
    ratio: tuple[float, float] | None = None
    tries: int | None = None
    augment: AugmentConfig | None = None
    clean: bool = False
    resize: int = 0
    centres: str = "box"

    def __post_init__(self) -> None:
        if self.centres not in CENTRES:
            raise ViewpipeError(f"a view group's centres must be one of {', '.join(CENTRES)}, got {self.centres!r}")
        if self.resize < 0 or (self.resize and self.resize < self.size):
            raise ViewpipeError(f"a clean view's resize must be 0 or at least its size {self.size}, got {self.resize}")
        if self.count < 1 or self.size < 1:
            raise ViewpipeError(f"a view group needs count >= 1 and size >= 1, got {self.count} x {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ViewpipeError(f"a view group's scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.ratio is not None and not 0 < self.ratio[0] <= self.ratio[1]:
            raise ViewpipeError(f"a view group's ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.tries is not None and self.tries < 1:
            raise ViewpipeError(f"a view group's tries must be >= 1, got {self.tries}")


def parse_views(spec: str, scale: tuple[float, float] = (0.2, 1.0)) -> tuple[ViewGroup, ...]:
    """View groups from `COUNTxSIZE[@MIN-MAX][:nobox|:heatmap]`, comma-separated, e.g. "2x224,6x96@0.05-0.2":
    two 224 px views at the crop scale `scale`, six 96 px views at (0.05, 0.2). A group without a range takes
    `scale` if it is the first, (0.05, 0.2) otherwise (the local crops of SwAV/DINO-style recipes);
    `:nobox` keeps a group off the ContrastiveCrop boxes, `:heatmap` centres its crops by the heatmaps' mass."""
    groups = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        try:
            part, _, flag = part.partition(":")
            if flag not in ("", "box", "nobox", "heatmap"):
                raise ValueError(flag)
            shape, _, rng = part.partition("@")
            count, size = (int(x) for x in shape.lower().split("x"))
            lo, hi = (float(x) for x in rng.split("-")) if rng else (scale if i == 0 else (0.05, 0.2))
        except ValueError:
            raise ViewpipeError(f"cannot read view group {part!r} of {spec!r}: expected "
                                "COUNTxSIZE[@MIN-MAX][:nobox|:heatmap], e.g. 2x224,6x96@0.05-0.2") from None
        centres = "heatmap" if flag == "heatmap" else "box"
        groups.append(ViewGroup(count, size, (lo, hi), flag != "nobox", centres=centres))
    return tuple(groups)


@dataclass(frozen=True)
class DaliOptions:
    """The DALI backend's own settings: `hw_decoder_load`, the share of the JPEG decoding given to the GPU's
    hardware decoder (the rest on CUDA cores); `prefetch_queue_depth`, DALI's queue of batches made ahead;
    `plan_ahead`, 0: each batch planned and its bytes gathered in DALI's callback, on the consumer's thread,
    N >= 1: by a thread, up to N batches before DALI asks (the same batches; a state update arrives N later)."""

    hw_decoder_load: float = 0.65
    prefetch_queue_depth: int = 2
    plan_ahead: int = 0

    def __post_init__(self) -> None:
        if self.plan_ahead < 0:
            raise ViewpipeError(f"dali: plan_ahead must be >= 0, got {self.plan_ahead}")


@dataclass(frozen=True)
class FfcvOptions:
    """The FFCV backend's own settings: `batches_ahead`, FFCV's queue; `fused`, crop and resize on FFCV's CPU
    threads as FFCV's own decoders do (OpenCV INTER_AREA), only the photometric steps on the device."""

    batches_ahead: int = 2
    fused: bool = False


@dataclass(frozen=True)
class ReferenceOptions:
    """The reference backend's own settings: the DataLoader's `prefetch_factor` (batches per worker ahead)."""

    prefetch_factor: int = 2


@dataclass
class LoaderConfig:
    """What every backend is asked for: views per image, batch, crop sampling and augmentation, where the
    views are made, and each backend's own settings (`dali`, `ffcv`, `reference`: the other backends ignore
    them). `groups` (multi-crop): the views in groups of their own count, size, scale and box use, in order;
    without it, `views` views of `augment.size` at `crop.scale`. With groups, `views` is their total count."""

    views: int = 2
    batch_size: int = 256
    crop: CropConfig = field(default_factory=CropConfig)
    augment: AugmentConfig = field(default_factory=lambda: preset("mocov2"))
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    augment_impl: str = "auto"  # "fused" (Triton kernels), "torch" (the reference ops), "auto": fused on CUDA
    dtype: str = "float32"  # the views' dtype: "float32" or "bfloat16"
    channels_last: bool = False  # the views' memory format
    groups: tuple[ViewGroup, ...] = ()
    companions: bool = False  # 2V views: the samples' V, then V of one neighbour each (the state's table)
    device: str = "auto"  # where the views are made and handed over: "cpu", "cuda[:i]"; "auto": CUDA if any
    overlap: bool | None = None  # make batch b + 1 while the consumer has batch b; None: on with CUDA
    split: str = "train"  # the split of a .npz collection given as a path
    dali: DaliOptions = field(default_factory=DaliOptions)
    ffcv: FfcvOptions = field(default_factory=FfcvOptions)
    reference: ReferenceOptions = field(default_factory=ReferenceOptions)

    def __post_init__(self) -> None:
        if self.groups:
            self.views = sum(g.count for g in self.groups)

    def view_groups(self) -> tuple[ViewGroup, ...]:
        """The views' groups (one group of `views` views of `augment.size` at `crop.scale` without `groups`)."""
        return self.groups or (ViewGroup(self.views, self.augment.size, self.crop.scale, True),)

    def group_of_views(self) -> list[int]:
        """For each view, the index of its group."""
        return [g for g, group in enumerate(self.view_groups()) for _ in range(group.count)]

    def groups_of_views(self) -> list[ViewGroup]:
        """For each view, its group."""
        return [group for group in self.view_groups() for _ in range(group.count)]

    def view_sizes(self) -> list[int]:
        """For each view, its output side."""
        groups = self.view_groups()
        return [groups[g].size for g in self.group_of_views()]

    def group_augment(self, g: int) -> AugmentConfig:
        """The augmentation of group g's views: the group's own or `augment`, at the group's output size."""
        group = self.view_groups()[g]
        return replace(group.augment or self.augment, size=group.size)

    def group_crop(self, g: int) -> CropConfig:
        """The crop sampling of group g's views: `crop` with the group's scale, ratio, tries and box use."""
        group, crop = self.view_groups()[g], self.crop
        return replace(crop, scale=group.scale, ratio=group.ratio or crop.ratio, tries=group.tries or crop.tries,
                       use_box=crop.use_box and group.use_box)
