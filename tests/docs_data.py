"""The data the documentation's Python examples run on (tests/test_docs.py), laid out as the pages name it,
relative to the directory the examples run in:

    data/train/            an ImageNet-style folder (root/<class>/<file>.jpg) of 96 generated JPEGs,
                           40-96 px, 12 classes (`viewpipe.synthetic.make_folder`), true boxes in boxes.npy
    data/test/             48 more such images, another seed: a held-out set
    data/train-converted/  data/train converted by `viewpipe convert data/train data/train-converted`
                           (DALI shards and FFCV's data.beton in one folder, as the command writes them)

Small enough that every example runs in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

TRAIN, TEST, CONVERTED = "data/train", "data/test", "data/train-converted"


def make_docs_data(root: Path) -> Path:
    """Write the layout above under `root` (once; later calls find it) and return `root`."""
    from viewpipe.convert import convert
    from viewpipe.synthetic import make_folder

    root = Path(root)
    if not (root / TRAIN).is_dir():
        make_folder(root / TRAIN, n=96, size_range=(40, 96), seed=1)
    if not (root / TEST).is_dir():
        make_folder(root / TEST, n=48, size_range=(40, 96), seed=2)
    if not (root / CONVERTED / "convert_report.json").is_file():
        convert(root / TRAIN, root / CONVERTED, formats=("dali", "ffcv"), workers=1, shard_size=32)
    return root
