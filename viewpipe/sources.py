"""Where encoded images come from: an ImageNet-style folder, a `.npz` JPEG collection (../shared/data), or a
dataset converted by `viewpipe convert` (its WebDataset shards).

A source is a list of samples (encoded bytes + label) addressed by index; the sample's index is its row
in the SampleState. A folder without class folders (a flat folder of images) is an *unlabelled* source:
self-supervised pretraining needs no labels, so every sample gets the label -1 and `classes` is empty
(`is_labelled` tells; a dataset converted from one stays unlabelled); kNN and linear evaluation refuse it.
Sources pickle cheaply (the `.npz` arrays are memory-mapped, not copied), so DataLoader workers started by
fork, spawn or forkserver all share the same pages.
"""

from __future__ import annotations

import mmap
import os
import stat
import zipfile
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import UnreadableFileError, ViewpipeError
from .formats import INDEX, DatasetIndex, oriented_size, sample_checksum, shard_paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Source(Protocol):
    """Encoded images addressed by sample index."""

    classes: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes: ...

    def describe(self, index: int) -> str: ...


UNLABELLED = -1  # the label of every sample of an unlabelled source


def is_labelled(source: Source) -> bool:
    """Whether `source` has class labels: it names its classes and no sample carries the label -1 (an
    unlabelled folder, or a dataset converted from one, has neither)."""
    labels = np.asarray(source.labels)
    return bool(source.classes) and not (labels.size and int(labels.min()) < 0)


class FolderSource:
    """`root/<class>/**/<file>` as torchvision's ImageFolder: class index = position in the sorted folder names.
    A folder with no sub-folders (a flat folder of images), or any tree read with `labelled=False`, is
    unlabelled: every file under it, in `os.walk` order, with label -1 and no classes (`self.labelled` False).

    `extensions=None` lists every file (what `viewpipe convert` does, so that every file is accounted for);
    with class folders, files directly in `root` are kept in `stray`, class folders without files in
    `empty_classes`. `labelled`: None decides from the layout (sub-folders: class folders), True requires class
    folders, False reads the whole tree without labels (for a tree whose folders are not classes)."""

    def __init__(self, root: str | os.PathLike[str], extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
                 labelled: bool | None = None) -> None:
        root = Path(root)
        expected = "an image folder (root/<class>/<image>, or a flat folder of images for pretraining) or a .npz"
        if not root.exists():
            raise ViewpipeError(f"{root}: no such file or folder; give {expected}")
        if not root.is_dir():
            raise ViewpipeError(f"{root}: not a folder; give {expected}")
        self.root = root
        try:
            entries = sorted(os.scandir(root), key=lambda d: d.name)
        except OSError as exc:
            raise ViewpipeError(f"{root}: cannot list the folder ({exc.strerror}); check its permissions") from None
        self.classes = [d.name for d in entries if d.is_dir()]
        self.stray = [d.path for d in entries if not d.is_dir()]
        paths: list[str] = []
        labels: list[int] = []
        self.unlistable: list[str] = []
        self.empty_classes: list[str] = []
        self.repeated_folders: list[str] = []  # links to a folder already listed in the same class (loops), not followed
        if labelled is True and not self.classes:
            raise ViewpipeError(f"{root}: no class folders; expected root/<class>/<image> as torchvision's ImageFolder")
        self.labelled = bool(self.classes) if labelled is None else labelled
        if not self.labelled:
            self.classes, self.stray = [], []
            for dirpath, files in sorted(_walk_once(str(root), self.unlistable, self.repeated_folders)):
                paths += [os.path.join(dirpath, f) for f in sorted(files)
                          if extensions is None or f.lower().endswith(extensions)]
            if not paths:
                kinds = "files" if extensions is None else f"image files ({', '.join(extensions)})"
                raise ViewpipeError(f"{root}: no class folders and no {kinds}; give root/<class>/<image> "
                                    "(labelled) or a folder of images (unlabelled, for pretraining)")
            self.paths = paths
            self.labels = np.full(len(paths), UNLABELLED, dtype=np.int64)
            return
        for label, name in enumerate(self.classes):
            before = len(paths)
            walk = _walk_once(str(root / name), self.unlistable, self.repeated_folders)
            for dirpath, files in sorted(walk):  # ImageFolder's order
                for f in sorted(files):
                    if extensions is None or f.lower().endswith(extensions):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(label)
            if len(paths) == before:
                self.empty_classes.append(name)
        if not paths:
            kinds = "files" if extensions is None else f"image files ({', '.join(extensions)})"
            raise ViewpipeError(f"{root}: no {kinds} under its {len(self.classes)} class folders")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        """The file's bytes; an `UnreadableFileError` (one line) for one that cannot be read or is not a regular
        file (`read_regular`)."""
        return read_regular(self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _not_regular(mode: int) -> str:
    """"" for a regular file, else the reason a file of this mode is not read: "not a regular file (a FIFO)"."""
    if stat.S_ISREG(mode):
        return ""
    return f"not a regular file ({next((what for is_kind, what in _KINDS if is_kind(mode)), 'of another kind')})"


def read_regular(path: str) -> bytes:
    """The bytes of the regular file at `path` (links followed). Opened without blocking and checked before it
    is read: a FIFO named like an image would wait for a writer forever, a link to a device read without end,
    a socket fail with an obscure errno. Any of them, or a file that cannot be read (a dangling link, no
    permission), is an `UnreadableFileError`: one line naming the file, the reason and what to do."""
    fd = -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        reason = _not_regular(os.fstat(fd).st_mode)
        if not reason:
            with os.fdopen(fd, "rb") as f:
                fd = -1  # (closed with f)
                return f.read()
    except OSError as exc:
        reason = _reason_of(path, exc)
    finally:
        if fd >= 0:
            os.close(fd)
    fix = "remove it" if reason.startswith("not a regular") else "fix its permissions or remove it"
    raise UnreadableFileError(f"{path}: {reason}; {fix}", reason)


def _reason_of(path: str, exc: OSError) -> str:
    """Why `path` could not be opened or read: its kind when it is not a regular file (a socket refuses `open`
    with ENXIO), else the system's "cannot read (<strerror>)"."""
    try:
        reason = _not_regular(os.stat(path).st_mode)
    except OSError:
        reason = ""
    return reason or f"cannot read ({exc.strerror})"


def _identity(path: str, unlistable: list[str]) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the folder at `path`, or None (and the path in `unlistable`) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        unlistable.append(exc.filename or path)
        return None
    return st.st_dev, st.st_ino


def _scan(folder: str, unlistable: list[str]) -> tuple[list[str], list[str], list[str]] | None:
    """The entries of `folder` in name order: (names of its non-folder entries, paths of its folders, paths of its
    links to folders); None (and the folder in `unlistable`) when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        unlistable.append(exc.filename or folder)
        return None
    files, folders, links = [], [], []
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            files.append(e.name)
        else:
            (links if e.is_symlink() else folders).append(e.path)
    return files, folders, links


def _walk_once(top: str, unlistable: list[str], repeated: list[str]) -> list[tuple[str, list[str]]]:
    """(folder, names of its non-folder entries) for `top` and every folder under it, as `os.walk(top,
    followlinks=True)` lists them, except that each real folder ((st_dev, st_ino)) is listed once: a link to a
    folder already listed (a loop such as `cls/self -> .`, or a second link to one folder) is put in `repeated`
    and not followed. Folders reached without links come first, so they keep their own paths; then links, in
    sorted order. Folders that cannot be listed go to `unlistable`."""
    out: list[tuple[str, list[str]]] = []
    seen: set[tuple[int, int]] = set()
    links: list[str] = []
    identity = partial(_identity, unlistable=unlistable)

    def walk(start: str) -> None:
        stack = [start]
        while stack:
            folder = stack.pop()
            scanned = _scan(folder, unlistable)
            if scanned is None:
                continue
            files, folders, found_links = scanned
            links.extend(found_links)  # followed after every folder reached without links
            for path in folders:
                if (key := identity(path)) is not None and key not in seen:  # a bind mount may repeat one
                    seen.add(key)
                    stack.append(path)
                elif key is not None:
                    repeated.append(path)
            out.append((folder, files))

    key = identity(top)
    if key is None:
        return out
    seen.add(key)
    walk(top)
    while links:
        links.sort()
        link = links.pop(0)
        key = identity(link)
        if key is None:
            continue
        if key in seen:
            repeated.append(link)
            continue
        seen.add(key)
        walk(link)
    return out


def _npz_member(path: Path, zf: zipfile.ZipFile, member: str) -> np.ndarray:
    """Memory-map an uncompressed `.npy` member of a `.npz`, or load it if it is compressed."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return np.load(zf.open(member), allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ViewpipeError(f"{path}: member {member} holds Python objects; viewpipe reads plain arrays only")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NpzSource:
    """A `.npz` JPEG collection: `<split>_jpeg` (concatenated files), `<split>_offsets`, `<split>_labels`."""

    def __init__(self, path: str | os.PathLike[str], split: str = "train") -> None:
        path = Path(path)
        if not path.is_file():
            raise ViewpipeError(f"{path}: no such file")
        self.path, self.split = path, split
        try:
            with zipfile.ZipFile(path) as zf:
                names = {n.removesuffix(".npy") for n in zf.namelist()}
                needed = [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"]
                if missing := [n for n in needed if n not in names]:
                    splits = sorted(n.removesuffix("_jpeg") for n in names if n.endswith("_jpeg"))
                    raise ViewpipeError(f"{path}: no split {split!r} (missing {', '.join(missing)}); splits: {splits}")
                self.jpeg, self.offsets, self.labels = (_npz_member(path, zf, f"{n}.npy") for n in needed)
                self.src = _npz_member(path, zf, f"{split}_src_path.npy") if f"{split}_src_path" in names else None
                class_key = next((k for k in ("class_names", "class_wnids") if k in names), None)
                self.classes = [_text(c) for c in np.load(zf.open(f"{class_key}.npy"))] if class_key else []
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ViewpipeError(f"{path}: not a readable .npz JPEG collection ({exc})") from None
        if not self.classes:
            self.classes = [str(c) for c in range(int(self.labels.max()) + 1)]
        if len(self.offsets) != len(self.labels) + 1:
            raise ViewpipeError(f"{path}: {split}_offsets must have one more entry than {split}_labels")

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        return self.jpeg[int(self.offsets[index]) : int(self.offsets[index + 1])].tobytes()

    def describe(self, index: int) -> str:
        where = f"{self.path}[{self.split}][{index}]"
        return f"{where} ({_text(self.src[index])})" if self.src is not None else where


class ShardSource:
    """A converted dataset's images, sliced out of its memory-mapped WebDataset shards with the offsets of
    its index; `sizes` (N, 2) are the (height, width) the index recorded, so no header is parsed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.index = index = DatasetIndex.load(self.root)
        if (index.shards < 0).any():
            raise ViewpipeError(f"{root}: the dataset has no DALI shards; convert it with --format dali (or both)")
        self.labels, self.classes = index.labels, index.classes
        self.sizes = np.stack([index.heights, index.widths], 1).astype(np.int64)
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_maps": {}}  # mappings are reopened in the process that reads

    def _map(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            tar, _ = shard_paths(self.root, shard)
            try:
                with open(tar, "rb") as f:
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise ViewpipeError(f"{tar}: cannot open shard ({exc.strerror}); re-run `viewpipe convert`") from None
        return self._maps[shard]

    def view(self, index: int) -> np.ndarray:
        """The encoded image as a uint8 array over the mapped shard (no copy)."""
        idx = self.index
        return np.frombuffer(self._map(int(idx.shards[index])), dtype=np.uint8, count=int(idx.nbytes[index]),
                             offset=int(idx.offsets[index]))

    def read(self, index: int) -> bytes:
        return self.view(index).tobytes()

    def damaged(self, indices: np.ndarray) -> dict[int, str]:
        """The samples among `indices` whose bytes differ from the checksum the conversion wrote (each sample
        checked once per process: a CRC-32 costs about 1 ms per 7 MB), index → why. Indexes written before
        checksums check nothing."""
        sums = self.index.checksums
        if sums is None:
            return {}
        if not hasattr(self, "_checked"):
            self._checked = np.zeros(len(self), dtype=bool)
        out: dict[int, str] = {}
        for k in np.asarray(indices).tolist():
            if not self._checked[k]:
                if sample_checksum(self.view(k)) != int(sums[k]):
                    out[k] = "is damaged (its bytes differ from the CRC-32 written at conversion)"
                else:
                    self._checked[k] = True
        return out

    def describe(self, index: int) -> str:
        tar, _ = shard_paths(self.root, int(self.index.shards[index]))
        return f"{tar} (sample {index} at byte {int(self.index.offsets[index])}, from {_text(self.index.sources[index])})"

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def open_source(path: str | os.PathLike[str], split: str = "train", labelled: bool | None = None) -> Source:
    """A `.npz` → `NpzSource` of `split`; a converted dataset (with an index.npz) → `ShardSource`; another
    folder → `FolderSource` (`labelled`: its argument; by default a folder without sub-folders is unlabelled)."""
    path = Path(path)
    if path.suffix == ".npz":
        return NpzSource(path, split)
    if (path / INDEX).is_file():
        return ShardSource(path)
    return FolderSource(path, labelled=labelled)


class ImageSizes:
    """(height, width) after EXIF orientation of a source's samples, for planning crops before decoding: a
    converted dataset's from its index, other sources' from the image headers, parsed the first time a
    sample is checked (`check`, which names the samples whose header cannot be read)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        shards = isinstance(source, ShardSource)
        self._sizes = source.sizes if shards else np.full((len(source), 2), -1, dtype=np.int64)

    def check(self, indices: np.ndarray) -> dict[int, str]:
        """Parse the headers not parsed yet; the samples among `indices` that have none readable (index → why)."""
        failed: dict[int, str] = {}
        for k in np.asarray(indices).tolist():
            if self._sizes[k, 0] < 0:
                try:
                    self._sizes[k] = oriented_size(self.source.read(k))
                except Exception as exc:  # noqa: BLE001  a damaged header can raise anything
                    failed[k] = f"fails to decode: cannot read the image header ({exc})"
        return failed

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), 2) int64 sizes of checked samples."""
        out = self._sizes[np.asarray(indices)]
        if (out < 0).any():
            raise RuntimeError("ImageSizes: sizes asked for before the samples were checked")
        return out
