"""`ViewFinisher`: every view of a batch cut (where the backend has not) and finished by the augmenter of
its view group."""

from __future__ import annotations

from typing import Any

from viewpipe.errors import ViewpipeError
from viewpipe.pipelines.config import LoaderConfig


class ViewFinisher:
    """Finishes every view of a batch with the augmenter of its group (`viewpipe.augment.Augmenter`, as `cfg`
    asks: implementation, dtype, memory format), view v drawing view v's parameters from the batch's
    generator; views V + v (companions) like view v."""

    def __init__(self, cfg: LoaderConfig) -> None:
        import torch

        from viewpipe.augment import Augmenter

        if cfg.dtype not in ("float32", "bfloat16"):
            raise ViewpipeError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
        self.cfg, self.group = cfg, cfg.group_of_views()
        self.augmenters = [Augmenter(cfg.group_augment(g), channels_last=cfg.channels_last, impl=cfg.augment_impl,
                                     out_dtype=getattr(torch, cfg.dtype)) for g in range(len(cfg.view_groups()))]

    def finish(self, x: Any, v: int, generator: Any, layout: str = "chw") -> Any:
        """View v (of 2V with companions) finished: `Augmenter.finish` of its group."""
        V = self.cfg.views
        return self.augmenters[self.group[v % V]].finish(x, v % V, generator, layout=layout)

    def crop_and_finish(self, images: Any, windows: Any, generator: Any, layout: str = "auto") -> list:
        """V views cut from `images` at `windows` (B, V, 4) and finished, group by group (`Augmenter.forward`;
        a clean group's views resized as PIL does, `resize_windows`)."""
        import torch

        from viewpipe.torch_ops import resize_windows

        out, start = [], 0
        for group, aug in zip(self.cfg.view_groups(), self.augmenters):
            win = torch.as_tensor(windows)[:, start : start + group.count]
            if group.clean:
                cut = [resize_windows(images, win[:, v], group.size, layout, group.resize) for v in range(group.count)]
                out += [aug.finish(x, start + v, generator) for v, x in enumerate(cut)]
            else:
                out += aug(images, win, generator, layout=layout, first_view=start)
            start += group.count
        return out
