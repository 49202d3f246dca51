"""Damaged bytes inside a converted dataset's shards (random bytes in the middle of one sample's JPEG data,
same length: libjpeg still decodes it, into garbage): every backend that reads the shards finds the sample by
the CRC-32 the conversion wrote, replaces it by the next sample for the rest of the run, names it once on
stderr and keeps it in `decode_failures`. (The FFCV backend reads its .beton: there libjpeg-turbo's status
finds such damage; tests/test_ffcv.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import nvidia.dali  # noqa: F401  (`make test` installs it: a missing backend fails, never skips)

from conftest import build
from viewpipe.augment import preset
from viewpipe.formats import DatasetIndex, shard_paths
from viewpipe.pipelines import LoaderConfig, get_backend
from viewpipe.sources import ShardSource
from viewpipe.convert import convert

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BAD = 40


@pytest.fixture(scope="module")
def damaged(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("damaged") / "ds"
    convert(image_folder, dst, formats=("dali",), workers=1, shard_size=32)
    index = DatasetIndex.load(dst)
    assert index.checksums is not None
    tar, _ = shard_paths(dst, int(index.shards[BAD]))
    with open(tar, "r+b") as f:
        f.seek(int(index.offsets[BAD]) + int(index.nbytes[BAD]) // 2)
        f.write(np.random.default_rng(1).integers(0, 256, 32, dtype=np.uint8).tobytes())
    return dst


def test_the_source_names_the_damaged_sample(damaged: Path) -> None:
    src = ShardSource(damaged)
    assert list(src.damaged(np.arange(len(src)))) == [BAD]
    assert src.damaged(np.arange(len(src))) == {BAD: src.damaged(np.array([BAD]))[BAD]}  # good ones checked once


@pytest.mark.parametrize("backend,kw", [("torch", {}), ("dali", {"device": "cpu"}), ("memory", {}),
                                        ("dali", {"device": "cpu", "plan_ahead": 2})],
                         ids=["torch", "dali", "memory", "dali-plan_ahead2"])
def test_every_backend_replaces_it(damaged: Path, backend: str, kw: dict, capfd: pytest.CaptureFixture) -> None:
    cfg = LoaderConfig(views=2, batch_size=16, augment=preset("mocov2", size=24), workers=1, drop_last=False)
    loader = build(get_backend(backend), damaged, cfg, **kw)
    seen = [k for batch in loader for k in batch.indices.tolist()]
    err = capfd.readouterr().err
    assert err.count("is damaged") == 1 and f"sample {BAD} " in err and f"replaced by sample {BAD + 1}" in err
    assert BAD not in seen and seen.count(BAD + 1) == 2 and len(seen) == 96
    assert list(loader.decode_failures) == [BAD]
    getattr(loader, "close", lambda: None)()
