"""Configs as OmegaConf structured configs: errors that name the override, nested override values, interpolation,
the resolved config.yaml of a run, shipped configs by name, per-group crop and augmentation, --help-config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.config import (TrainConfig, build_augment, build_crop, build_groups, config_names, cpu_cores,
                                      effective_workers, find_config, help_config, load_config, save_config)
from viewpipe.trainers.confighelp import describe
from viewpipe.trainers.overrides import parse_value


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------ override errors
@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.3", "override optim.lrr=0.3: unknown key lrr in optim; known: betas, final_lr_ratio, lr,"),
    ("optim={lrr: 0.3}", "override optim={lrr: 0.3}: unknown key lrr in optim; known: "),
    ("lrr=0.3", "override lrr=0.3: unknown key lrr; known: amp, backbone,"),
    ("data.groups=[{count: 2, sise: 32}]", "override data.groups=[{count: 2, sise: 32}]: unknown key sise in "
                                           "data.groups[0]; known: augment, box, centres, count,"),
    ("optim.lr=fast", "override optim.lr=fast: optim.lr: expected float, got 'fast'"),
    ("data.size=1.5", "override data.size=1.5: data.size: expected int, got 1.5"),
    ("amp=yes please", "override amp=yes please: amp: expected true or false, got 'yes please'"),
    ("data.crop.scale=[0.2]", "override data.crop.scale=[0.2]: data.crop.scale: expected a list [float, float]"),
    ("optim.lr.x=1", "override optim.lr.x=1: optim.lr: expected float, got {'x': 1}"),
    ("method_args={queue: 1", "override method_args={queue: 1: cannot read '{queue: 1': expected ',' or '}'"),
    ("data.groups[0].size=96", "override data.groups[0].size=96: data.groups has 0 entries (indices from 0); "
                               "give the whole list: data.groups=[...]"),
    ("data.crop.scale[2]=0.5", "override data.crop.scale[2]=0.5: data.crop.scale has 2 entries (indices from 0)"),
    ("optim.lr[0]=1", "override optim.lr[0]=1: optim.lr is not a list"),
    ("data.groups[x].size=1", "override 'data.groups[x].size=1': expected key=value, e.g. optim.lr=0.3 or "
                              "data.groups[1].size=96"),
])
def test_override_errors_name_the_override(override: str, message: str) -> None:
    with pytest.raises(ViewpipeError) as info:
        load_config(None, [override])
    assert one_line(info).startswith(message), str(info.value)


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lrr: 0.3}\n")
    with pytest.raises(ViewpipeError) as info:
        load_config(f)
    assert one_line(info).startswith(f"{f}: unknown key lrr in optim; known: ")
    f.write_text("data: {groups: [{count: two}]}\n")
    with pytest.raises(ViewpipeError) as info:
        load_config(f)
    assert one_line(info) == f"{f}.data.groups[0].count: expected int, got 'two'"


# ------------------------------------------------------------------------------------------ override values
def test_overrides_index_into_lists(tmp_path: Path) -> None:
    """`data.groups[1].size=112` (or `data.groups.1.size`) changes one entry of a list, the rest kept as the file
    gave them; an index into a tuple field too; an entry's unknown key or bad value names the override."""
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  groups:\n    - {count: 2, size: 224, augment: {blur: 1.0}}\n"
                 "    - {count: 6, size: 96, scale: [0.05, 0.2]}\n")
    cfg = load_config(f, ["data.groups[1].size=112", "data.groups.0.augment.blur=0.5", "data.groups[1].scale[1]=0.3",
                          "data.crop.scale[0]=0.1"])
    g = cfg.data.groups
    assert [(x.count, x.size, x.scale) for x in g] == [(2, 224, None), (6, 112, (0.05, 0.3))]
    assert g[0].augment.blur == 0.5 and cfg.data.crop.scale == (0.1, 1.0)
    with pytest.raises(ViewpipeError) as info:
        load_config(f, ["data.groups[1].sise=3"])
    assert one_line(info).startswith("override data.groups[1].sise=3: unknown key sise in data.groups[1]; known: ")
    with pytest.raises(ViewpipeError) as info:
        load_config(f, ["data.groups[1].size=big"])
    assert one_line(info) == "override data.groups[1].size=big: data.groups[1].size: expected int, got 'big'"
    assert [x.count for x in load_config("mocov2_multicrop_ccrop_imagenet", ["data.groups[1].count=4"]).data.groups] \
        == [2, 4]


def test_nested_override_values_need_no_space_after_the_colon(tmp_path: Path) -> None:
    cfg = load_config(None, ["method_args={queue:1024}"])
    assert cfg.method_args == {"queue": 1024}
    cfg = load_config(None, ["method_args={queue:1024,tau:0.2, name: 'a:b'}", "data.crop.scale=[0.1,0.5]",
                             "optim={lr:0.3,betas:[0.8, 0.9]}", "data.groups=[{count:2,size:16},{count:1}]"])
    assert cfg.method_args == {"queue": 1024, "tau": 0.2, "name": "a:b"}
    assert cfg.data.crop.scale == (0.1, 0.5) and cfg.optim.lr == 0.3 and cfg.optim.betas == (0.8, 0.9)
    assert [(g.count, g.size) for g in cfg.data.groups] == [(2, 16), (1, 0)]
    # a value replaces what was there (a whole mapping, or one of its keys); a section merges field by field
    f = tmp_path / "c.yaml"
    f.write_text("method_args: {dim: 64, queue: 65536}\noptim: {lr: 0.1, momentum: 0.5}\n")
    assert load_config(f, ["method_args={queue:1024}"]).method_args == {"queue": 1024}
    assert load_config(f, ["method_args.queue=8"]).method_args == {"dim": 64, "queue": 8}
    assert load_config(f, ["method_args={queue: 1}", "method_args={dim: 2}"]).method_args == {"dim": 2}
    optim = load_config(f, ["optim={lr: 0.3}"]).optim
    assert (optim.lr, optim.momentum) == (0.3, 0.5)
    assert parse_value("{a:{b:[1, {c:x}]}, d: ${data.size}}") == {"a": {"b": [1, {"c": "x"}]}, "d": "${data.size}"}
    assert parse_value("0.3") == 0.3 and parse_value("text") == "text" and parse_value("null") is None
    assert parse_value('{"queue": 96, "tau": 0.2}') == {"queue": 96, "tau": 0.2}  # JSON, as viewpipe quality writes


def test_interpolation(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data: {size: 48}\nccrop: {size: '${data.size}'}\nout: runs/${method}-${data.size}\n")
    cfg = load_config(f)
    assert (cfg.ccrop.size, cfg.out) == (48, "runs/mocov2-48")
    cfg = load_config(f, ["data.size=64", "method=simsiam"])  # resolved after every override
    assert (cfg.ccrop.size, cfg.out) == (64, "runs/simsiam-64")
    assert load_config(None, ["ccrop.size=${data.size}"]).ccrop.size == 32
    with pytest.raises(ViewpipeError) as info:
        load_config(None, ["ccrop.size=${data.sise}"])
    assert one_line(info).startswith("config.ccrop.size: ") and "data.sise" in str(info.value)


# ------------------------------------------------------------------------------------------ config.yaml
def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "method_args={queue: 64, tau: 0.2}", "data.size=${ccrop.grid}", "data.crop={ratio: [0.5, 2.0], tries: 3}",
        "data.augment={blur: 0.25, views: [{solarize: 0.1}, {flip: 0.0}]}", "optim.name=adamw",
        "data.groups=[{count: 2}, {count: 3, size: 16, scale: [0.05, 0.2], box: false, augment: {preset: byol}}]"])
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml" and "${" not in path.read_text()  # resolved
    again = load_config(path)
    assert again == cfg and again.data.size == 32 and again.data.groups[1].scale == (0.05, 0.2)


def test_trainer_writes_the_resolved_config(image_folder: Path, tmp_path: Path) -> None:
    from viewpipe.trainers.engine import Trainer

    out = tmp_path / "run"
    cfg = load_config(None, [f"data.path={image_folder}", "backbone=resnet_tiny", "device=cpu", f"out={out}",
                             "data.batch_size=8", "data.workers=1", "ccrop.size=${data.size}", "knn_every=0",
                             "data.groups=[{count: 2}, {count: 2, size: 16, augment: {blur: 1.0}}]"])
    t = Trainer(cfg)
    try:
        assert load_config(out / "config.yaml") == cfg
        batch = next(iter(t.loader(0)))
        assert [v.shape[-1] for v in batch.views] == [32, 32, 16, 16]
    finally:
        t.close()


# ------------------------------------------------------------------------------------------ per-group settings
def test_every_crop_and_augment_field_per_group(image_folder: Path) -> None:
    from viewpipe.pipelines import LoaderConfig
    from conftest import build
    from viewpipe.pipelines.reference import ReferenceLoader

    cfg = load_config(None, [
        "data.crop={scale: [0.3, 0.9], ratio: [1.0, 1.0], tries: 7}", "data.augment={preset: simclr, grayscale: 0.0}",
        "data.groups=[{count: 2}, {count: 1, size: 16, scale: [0.05, 0.1], ratio: [2.0, 3.0], tries: 50, box: false,"
        " augment: {preset: byol, views: [{blur: 0.0}], mean: [0.5, 0.5, 0.5]}}]"])
    crop = build_crop(cfg, use_box=True)
    assert (crop.scale, crop.ratio, crop.tries, crop.alpha) == ((0.3, 0.9), (1.0, 1.0), 7, cfg.ccrop.alpha)
    g0, g1 = build_groups(cfg.data)
    assert (g0.count, g0.size, g0.scale, g0.ratio, g0.tries, g0.use_box) == (2, 32, (0.3, 0.9), (1.0, 1.0), 7, True)
    assert (g1.count, g1.size, g1.scale, g1.ratio, g1.tries, g1.use_box) == (1, 16, (0.05, 0.1), (2.0, 3.0), 50, False)
    assert g0.augment.views[0].jitter == (0.8, 0.8, 0.8, 0.2) and g0.augment.views[0].grayscale == 0.0  # simclr
    assert [v.blur for v in g1.augment.views] == [0.0, 0.0] and g1.augment.views[1].solarize == 0.2  # byol
    assert g1.augment.views[0].grayscale == 0.0 and g1.augment.mean == (0.5, 0.5, 0.5)  # data.augment, then its own
    lc = LoaderConfig(batch_size=8, crop=crop, augment=build_augment(cfg.data), workers=0, groups=(g0, g1))
    assert lc.group_augment(1).size == 16 and lc.group_crop(1).use_box is False
    loader = build(ReferenceLoader, image_folder, lc)
    try:
        batch = next(iter(loader))
    finally:
        loader.close() if hasattr(loader, "close") else None
    assert [v.shape[-1] for v in batch.views] == [32, 32, 16]
    w = batch.windows.numpy().astype(float)  # (B, 3, 4) top, left, h, w
    assert np.all(np.abs(w[:, :2, 3] - w[:, :2, 2]) <= 1)  # ratio [1, 1]: square
    wide = w[:, 2, 3] / w[:, 2, 2]
    assert np.all((wide > 1.8) & (wide < 3.3)), wide  # the group's own ratio


def test_group_validation() -> None:
    with pytest.raises(ViewpipeError) as info:
        load_config(None, ["data.multicrop=2x32", "data.groups=[{count: 2}]"])
    assert one_line(info).startswith("config.data.groups: data.multicrop is set too")
    with pytest.raises(ViewpipeError, match=r"config.data.groups: csml needs exactly 2 views of each sample, got 3"):
        load_config(None, ["method=csml", "data.groups=[{count: 2}, {count: 1}]"])
    with pytest.raises(ViewpipeError, match=r"^config.data.groups\[1\].scale: expected a number in \(0, 1\]"):
        load_config(None, ["data.groups=[{count: 2}, {count: 1, scale: [0.05, 1.5]}]"])
    with pytest.raises(ViewpipeError, match=r"^config.data.crop.ratio: expected \[min, max\] with min <= max"):
        load_config(None, ["data.crop.ratio=[2, 1]"])
    with pytest.raises(ViewpipeError, match=r"^config.data.groups\[0\].augment.preset: expected one of mocov2"):
        load_config(None, ["data.groups=[{count: 2, augment: {preset: fancy}}]"])
    with pytest.raises(ViewpipeError, match=r"^config.data.augment.views\[0\].flip: expected a number in \[0, 1\]"):
        load_config(None, ["data.augment.views=[{flip: 2}]"])


# ------------------------------------------------------------------------------------------ names, help, workers
def test_shipped_configs_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: the names come from the package
    names = config_names()
    assert "mocov2_ccrop_cifar10" in names and "mocov2_multicrop_ccrop_imagenet" in names
    data = ["data.path=data/train", "data.test_path=data/test"]
    for name in names:
        load_config(name, data)  # every shipped config loads by name
    assert find_config("mocov2_ccrop_cifar10") == find_config("mocov2_ccrop_cifar10.yaml")
    assert load_config("mocov2_ccrop_cifar10", data).out == "runs/mocov2_ccrop_cifar10"
    local = tmp_path / "mocov2_ccrop_cifar10.yaml"  # a file of that name wins
    local.write_text("epochs: 3\n")
    assert load_config("mocov2_ccrop_cifar10.yaml").epochs == 3
    with pytest.raises(ViewpipeError) as info:
        load_config("mocov3_cifar10")
    assert one_line(info).startswith("mocov3_cifar10: no such config file, nor a shipped config of that name; "
                                     "shipped: byol_ccrop_cifar10, ")


def test_help_config_lists_every_key() -> None:
    rows = {key: (tp, default, text) for key, tp, default, text in describe()}
    for key in ("optim.lr", "data.crop.scale", "data.crop.ratio", "data.crop.tries", "data.augment.jitter",
                "data.groups[].scale", "data.groups[].augment", "ccrop.alpha", "max_steps"):
        assert key in rows and rows[key][2], key
    assert rows["optim.lr"][:2] == ("float", "0.5") and "a number >= 0" in rows["optim.lr"][2]
    assert "GLOBAL" in rows["data.batch_size"][2] and "divided among the ranks" in rows["data.batch_size"][2]
    assert "one of torch, dali, ffcv, memory" in rows["data.backend"][2]
    text = help_config()
    assert all(key in text for key in rows)


def test_settings_take_the_core_dataclasses_keys() -> None:
    """The sections that set a core object's keys take their value types and defaults from the core dataclass;
    a core key the schema neither gives nor omits is an error when the schema is made."""
    import dataclasses

    from viewpipe.augment import ViewAugment
    from viewpipe.crop import CropConfig
    from viewpipe.trainers.schema import CropSettings, ViewAugmentSettings, bounded, schema_of

    keys = [f.name for f in dataclasses.fields(ViewAugment)]
    assert [f.name for f in dataclasses.fields(ViewAugmentSettings)] == keys
    assert all(getattr(ViewAugmentSettings(), k) is None for k in keys)
    crop = CropSettings()
    assert (crop.scale, crop.ratio, crop.tries) == (CropConfig.scale, CropConfig.ratio, CropConfig.tries)
    with pytest.raises(TypeError, match=r"Crop: CropConfig's keys \['tries'\] are neither in the schema nor omitted"):
        schema_of(CropConfig, "Crop", "", omit=("alpha", "use_box"), scale=bounded(), ratio=bounded())


def test_workers_default_to_the_cores() -> None:
    assert TrainConfig().data.workers == cpu_cores() == load_config(None).data.workers
    assert effective_workers(10_000) == cpu_cores() and effective_workers(0) == 0


def test_shipped_configs_name_no_path_outside_the_users_own() -> None:
    """The CIFAR-10 configs leave the data to the user (`???`): each missing key is one line naming it; an
    empty kNN test set turns the monitor off. No shipped config names a path above its working directory."""
    for name in config_names():
        text = find_config(name).read_text()
        assert "../" not in text and "shared/" not in text, name
        if not name.endswith("_cifar10"):
            continue
        with pytest.raises(ViewpipeError) as info:
            load_config(name)
        assert one_line(info) == (f"{name}.yaml: data.path is not set; add data.path=... to the command line "
                                  "(the config's comments say what it takes)")
        with pytest.raises(ViewpipeError, match=r"data\.test_path is not set"):
            load_config(name, ["data.path=data/train"])
        cfg = load_config(name, ["data.path=data/train", "data.test_path="])
        assert (cfg.data.path, cfg.data.test_path) == ("data/train", "")


def test_help_config_lists_every_methods_arguments() -> None:
    """`--help-config` lists each registered method's constructor arguments with type, default and a meaning
    taken from the constructor's docstring, so the list cannot fall behind the code."""
    import inspect

    from viewpipe.trainers.base import METHODS
    from viewpipe.trainers.confighelp import arg_meanings

    lines = help_config().splitlines()
    header = next(line for line in lines if line.startswith("KEY "))
    cols = [0, header.index("TYPE"), header.index("DEFAULT"), header.index("MEANING"), None]
    rows = [[line[a:b].strip() for a, b in zip(cols, cols[1:])] for line in lines if line.startswith("method_args.")]
    for method, cls in METHODS.items():
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        meanings = arg_meanings(inspect.getdoc(cls.__init__) or "")
        assert set(meanings) == {p.name for p in params}, f"{method}: document every argument in Args:"
        listed = {r[0][len("method_args."):]: r for r in rows if r[3].startswith(f"[{method}] ")}
        assert set(listed) == {p.name for p in params}, method
        for p in params:
            assert meanings[p.name] and listed[p.name][3] == f"[{method}] {meanings[p.name]}"
    assert ["method_args.queue", "int", "65536", "[mocov2] keys in the FIFO queue of negatives."] in rows
    assert ["method_args.levels", "tuple[int, ...]", "[3, 4]"] in [r[:3] for r in rows]
