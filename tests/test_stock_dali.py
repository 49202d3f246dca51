"""The expert stock DALI pipeline (`ExpertDaliLoader`, issue 24) in DALI's CPU mode: its views' sizes, dtype
and layout, and each conditional op drawn with its configured probability; its `viewpipe bench` row and the
"÷ stock DALI" column against the faster stock row.

How the probabilities are measured: every random op of an expert view has an explicit seed fixed by the
loader's seed, the view and the op (`_op_seed`), so two runs with the same seed read the same samples and cut
the same crops whichever other ops are switched on. A reference run has every op off and no normalisation
(mean 0, std 1: the fp16 views are the crops' grey levels / 255, which 255 × rounds back exactly); a run
with one op on at probability p then gives, per view, either the reference view bit for bit (not drawn) or
the op's effect on it (drawn), checked exactly where the op is exact (grayscale: BT.601 luma in all three
channels, within rounding; solarize: the lookup table; flip: the mirror image), as "changed, and smoother"
for the blur and "changed" for the colour jitter. The count of drawn views is then binomial(n, p), tested
within 4.5 standard deviations; the two views get different p (0.6 and 0.25)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build
from viewpipe.augment import AugmentConfig, ViewAugment, preset
from viewpipe.augment_params import CLEAN_VIEW
from viewpipe.pipelines import LoaderConfig, ViewGroup
from viewpipe.pipelines.baselines import STOCK_DALI, ExpertDaliLoader, StockDaliLoader
from viewpipe.pipelines.dali import DaliLoader

S = 32
BATCH, EPOCHS = 48, 2  # 96 images: 192 samples per view
P = (0.6, 0.25)  # each op's probability in view 0 and view 1
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: the views are grey levels / 255

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def expert_cfg(*views: ViewAugment, **kw) -> LoaderConfig:  # noqa: ANN003
    aug = AugmentConfig(size=S, views=views, **(RAW | kw.pop("norm", {})))
    return LoaderConfig(**(dict(views=2, batch_size=BATCH, augment=aug, workers=1, seed=5) | kw))


def run_views(data: Path, cfg: LoaderConfig, epochs: int = EPOCHS) -> tuple[list[np.ndarray], np.ndarray]:
    """Each view over `epochs` epochs of the expert loader as float32 (n, 3, S, S), and the samples' indices."""
    loader = build(ExpertDaliLoader, data, cfg, device="cpu")
    views, indices = [[] for _ in range(cfg.views)], []
    for e in range(epochs):
        loader.set_epoch(e)
        for batch in loader:
            for v, x in enumerate(batch.views):
                assert x.dtype == torch.float16 and x.shape == (BATCH, 3, S, S)
                views[v].append(np.rint(x.float().numpy() * 255))  # grey levels, exactly
            indices.append(batch.indices.numpy())
    loader.close()
    return [np.concatenate(v) for v in views], np.concatenate(indices)


@pytest.fixture(scope="module")
def reference(converted: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every op off: the crops themselves."""
    return run_views(converted, expert_cfg(CLEAN_VIEW))


def within_binomial(drawn: int, n: int, p: float, what: str) -> None:
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(drawn - n * p) <= 4.5 * sd + 1, f"{what}: {drawn} of {n} drawn, p {p}"


def gray(ref: np.ndarray) -> np.ndarray:
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), ref, axes=([0], [1]))  # (n, S, S)
    return np.repeat(luma[:, None], 3, axis=1)


def solarized(ref: np.ndarray, t: int = 128) -> np.ndarray:
    return np.where(ref >= t, 255 - ref, ref)


def total_variation(x: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(x, axis=-1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=-2)).mean(axis=(1, 2, 3))


# op: (the views with it on at probability p, whether a drawn view shows the op's effect on the reference)
OPS = {
    "grayscale": (lambda p: replace(CLEAN_VIEW, grayscale=p),
                  lambda got, ref: (np.abs(got - gray(ref)).max(axis=(1, 2, 3)) <= 1.0)
                  & (got[:, 0] == got[:, 1]).all(axis=(1, 2)) & (got[:, 1] == got[:, 2]).all(axis=(1, 2))),
    "solarize": (lambda p: replace(CLEAN_VIEW, solarize=p, solarize_threshold=0.5),
                 lambda got, ref: (got == solarized(ref)).all(axis=(1, 2, 3))),
    "blur": (lambda p: replace(CLEAN_VIEW, blur=p, blur_sigma=(1.0, 2.0)),
             lambda got, ref: total_variation(got) < total_variation(ref)),
    "flip": (lambda p: replace(CLEAN_VIEW, flip=p),
             lambda got, ref: (got == ref[..., ::-1]).all(axis=(1, 2, 3))),
    "jitter": (lambda p: replace(CLEAN_VIEW, jitter_p=p),
               lambda got, ref: np.ones(len(got), bool)),  # (any change: the factors are drawn)
}


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_runs_on_its_drawn_views_with_its_probability(converted: Path, reference: tuple, op: str) -> None:
    """Per view, the op's views are the reference views exactly where not drawn and the op's effect where
    drawn; the drawn fraction is the view's p (0.6 and 0.25) within binomial error; the samples and crops are
    the reference's (the explicit seeds)."""
    make, effect = OPS[op]
    ref_views, ref_indices = reference
    views, indices = run_views(converted, expert_cfg(make(P[0]), make(P[1])))
    np.testing.assert_array_equal(indices, ref_indices)
    for v, (got, ref) in enumerate(zip(views, ref_views)):
        same = (got == ref).all(axis=(1, 2, 3))
        drawn = ~same
        assert effect(got[drawn], ref[drawn]).all(), f"{op}, view {v}: a drawn view without the op's effect"
        within_binomial(int(drawn.sum()), len(got), P[v], f"{op}, view {v}")


def test_probability_one_and_zero_are_every_and_no_view(converted: Path, reference: tuple) -> None:
    """The controls: grayscale at p 1 in view 0 and (off) in view 1, solarize after it at p 1 in view 1."""
    ref_views, _ = reference
    views, _ = run_views(converted, expert_cfg(replace(CLEAN_VIEW, grayscale=1.0),
                                               replace(CLEAN_VIEW, solarize=1.0)), epochs=1)
    n = len(views[0])
    assert OPS["grayscale"][1](views[0], ref_views[0][:n]).all()
    assert (views[1] == solarized(ref_views[1][:n])).all() and not (views[1] == ref_views[1][:n]).all()


def test_views_are_fp16_normalised_in_the_configured_sizes_and_layout(converted: Path, reference: tuple) -> None:
    """fp16 (B, 3, S, S) per group size; ImageNet's normalisation of the same crops (the seeds); contiguous
    NCHW, or the same values in channels_last memory with `channels_last`."""
    norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ref_views, _ = reference
    mean, std = (255 * np.array(norm[k]).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    for channels_last in (False, True):
        cfg = expert_cfg(CLEAN_VIEW, norm=norm, channels_last=channels_last)
        loader = build(ExpertDaliLoader, converted, cfg, device="cpu")
        batch = next(iter(loader))
        loader.close()
        for v, x in enumerate(batch.views):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.dtype == torch.float16 and x.shape == (BATCH, 3, S, S) and x.is_contiguous(memory_format=fmt)
            want = (ref_views[v][:BATCH] - mean) / std  # the reference's first batch
            np.testing.assert_allclose(x.float().numpy(), want, atol=0.01)
    small = replace(preset("byol", size=16), **RAW)
    groups = (ViewGroup(2, S, (0.2, 1.0)), ViewGroup(2, 16, (0.05, 0.2), ratio=(1.0, 1.0), augment=small))
    cfg = LoaderConfig(views=4, batch_size=8, augment=preset("byol", size=S), groups=groups, workers=1)
    loader = build(ExpertDaliLoader, converted, cfg, device="cpu")
    views = next(iter(loader)).views
    loader.close()
    assert [(tuple(v.shape), v.dtype) for v in views] == [((8, 3, S, S), torch.float16)] * 2 + [
        ((8, 3, 16, 16), torch.float16)] * 2
    assert all(v.min() < -0.5 for v in views[:2]) and all(0 <= v.min() and v.max() <= 1 for v in views[2:])


def test_the_expert_graph_branches_where_todays_muxes(converted: Path) -> None:
    """The expert graph splits and merges the batch around its photometric ops (DALI conditionals) and has no
    arithmetic mux and no `fn.hsv`; today's stock graph muxes with arithmetic. Read from the serialised graphs."""
    import re
    from collections import Counter

    ops = re.compile(rb"_conditional__Split|_conditional__Merge|ArithmeticGenericOp|Hsv|ColorSpaceConversion")
    graphs = {}
    for cls in (StockDaliLoader, ExpertDaliLoader):
        loader = build(cls, converted, LoaderConfig(views=2, batch_size=8, augment=preset("byol", size=S), workers=1),
                       device="cpu")
        graphs[cls] = Counter(ops.findall(loader._build().serialize()))
    expert, today = graphs[ExpertDaliLoader], graphs[StockDaliLoader]
    assert expert[b"_conditional__Split"] and expert[b"_conditional__Merge"] and expert[b"ColorSpaceConversion"]
    assert not expert[b"ArithmeticGenericOp"] and not expert[b"Hsv"]
    assert today[b"ArithmeticGenericOp"] and today[b"Hsv"] and not today[b"_conditional__Split"]


# ------------------------------------------------------------------------------------ viewpipe bench
def test_bench_times_both_stock_rows_and_divides_by_the_faster(converted: Path) -> None:
    """The DALI backend names the expert beside today's stock pipeline, so `viewpipe bench` times both; the
    expert's row starts with "stock DALI"; "÷ stock DALI" divides by the faster of the two."""
    from viewpipe.tools.bench import BenchRow, stock_speed, table, time_loader

    assert DaliLoader.baselines()[-2:] == (StockDaliLoader, ExpertDaliLoader)
    cfg = LoaderConfig(views=2, batch_size=8, augment=preset("mocov2", size=S), workers=1)
    row = time_loader(ExpertDaliLoader(converted, replace(cfg, device="cpu")), 2)
    assert row.name == "stock DALI, 2 views, expert (conditionals, fp16)" and row.name.startswith(STOCK_DALI)
    assert row.images == 16 and row.views == 2 and len(row.name) <= 52
    today = BenchRow("stock DALI, 2 views (RRC + DALI colour ops)", 100, 1.0, 2)
    ours = BenchRow("dali, 2 views, ContrastiveCrop boxes", 300, 1.0, 2)
    for expert_speed in (50.0, 200.0):
        expert = replace(row, images=int(expert_speed), seconds=1.0)
        rows = [today, expert, ours]
        assert stock_speed(rows) == max(100.0, expert_speed)
        lines = table(rows).splitlines()
        assert lines[0].split()[-3:] == ["÷", "stock", "DALI"]
        got = {ln[:52].strip(): float(ln.split()[-1]) for ln in lines[1:]}
        assert got[row.name] == pytest.approx(expert_speed / max(100.0, expert_speed), abs=0.01)
        assert got[ours.name] == pytest.approx(300 / max(100.0, expert_speed), abs=0.01)
    assert stock_speed([ours]) is None
