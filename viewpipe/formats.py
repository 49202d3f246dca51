"""On-disk formats written by `viewpipe convert` and read by the loaders.

A converted dataset folder holds:

- `wds/NNNNNN.tar` + `wds/NNNNNN.idx`: WebDataset shards with DALI's own index files (format v1.2), read
  by `nvidia.dali.fn.readers.webdataset` and the webdataset ecosystem with no viewpipe code. Sample
  `{index:09d}` has `.jpg` or `.png` (the original bytes unless a conversion was needed), `.cls` (the label
  in ASCII, the webdataset convention) and `.meta` (two little-endian int64: sample index, label; read
  by DALI with `dtypes=INT64`).
- `data.beton`: the FFCV dataset (`image`: RGBImageField, `label`: IntField; position = sample index).
- `index.npz`: per sample label, height, width (after EXIF orientation), source path, shard, byte offset
  and size of the image in its shard, and checksums (`sample_checksum`, CRC-32) of the image bytes in its
  shard (`checksums`) and in the FFCV file (`ffcv_checksums`), each present when that format was written
  (indexes written before checksums load without them); `classes.txt`: `index<TAB>name` lines.
- `convert_report.json`: files seen, samples written, every skipped file with its reason.

Decoding policy, the same in every loader: EXIF orientation is applied (DALI's decoder does so by
default, and viewpipe's PIL decode calls `exif_transpose`); CMYK, palette and other modes become RGB.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ViewpipeError

SHARD_DIR = "wds"
BETON = "data.beton"
INDEX = "index.npz"
CLASSES = "classes.txt"
REPORT = "convert_report.json"
META_DTYPE = np.dtype("<i8")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb warning threshold (about 9459²)
# The longer side of every image in a conversion that writes an FFCV file, unless `max_side` says otherwise:
# 500, the max_resolution of FFCV's own ImageNet recipe (ffcv-imagenet: `./write_imagenet.sh 500 0.50 90`, the
# datasets of its ResNet-50 results; also quality 90, viewpipe's default). At natural ImageNet size an FFCV file
# took 4.2 GB per 1,000 images and loaded slower than stock FFCV. A DALI-only conversion keeps natural size.
FFCV_MAX_SIDE = 500
_ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def sample_checksum(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """The checksum stored per sample in the index (`DatasetIndex.checksums`, `.ffcv_checksums`): CRC-32 of the
    encoded bytes (any contiguous buffer), as an int in [0, 2**32). A loader recomputes it over the bytes it read
    to tell damaged data (a bit flip, a bad sector, a copy gone wrong) from what the conversion wrote."""
    return zlib.crc32(data) & 0xFFFFFFFF


CHECKSUM_DTYPE = np.dtype("<u4")


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write a file under a temporary name and rename it: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- probing one file
@dataclass
class Probe:
    """What converting one file gives: a sample (height, width after orientation, encoded bytes for the
    shards and their extension, and what was converted) or the reason it was skipped."""

    height: int = 0
    width: int = 0
    ext: str = ""
    note: str = ""  # a conversion made (e.g. "CMYK JPEG re-encoded as RGB JPEG"), empty if none
    skip: str = ""  # the reason the file is skipped, empty if it is a sample


def open_image(data: bytes):  # noqa: ANN201  (PIL.Image.Image)
    """Decode encoded bytes fully to an RGB image with its EXIF orientation applied."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img) or img
    return img.convert("RGB")


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for bytes that are not a decodable image (what `decode_rgb` turns into one line)."""
    from PIL import Image, UnidentifiedImageError

    return UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError


def decode_rgb(data: bytes, where: str):  # noqa: ANN201  (PIL.Image.Image)
    """`open_image` (RGB, EXIF orientation applied: the policy of every loader), or one clear error naming
    `where` for bytes that do not decode."""
    try:
        return open_image(data)
    except decode_errors() as exc:
        raise ViewpipeError(f"{where}: cannot decode image ({exc}); fix or remove the file") from None


def _oriented_size(img) -> tuple[int, int]:  # noqa: ANN001  (PIL.Image.Image, opened, not decoded)
    """(height, width) after EXIF orientation, from the header alone."""
    w, h = img.size
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  damaged EXIF: decoders ignore it too
        orientation = 1
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def oriented_size(data: bytes) -> tuple[int, int]:
    """(height, width) after EXIF orientation from the encoded bytes' header; PIL's errors as they are."""
    from PIL import Image

    return _oriented_size(Image.open(io.BytesIO(data)))


def _scaled(h: int, w: int, max_side: int) -> tuple[int, int]:
    """Size after a downscale to `max_side` (FFCV's `resizer` formula: floor of ratio × size)."""
    ratio = max_side / max(h, w)
    return (int(ratio * h), int(ratio * w)) if ratio < 1 else (h, w)


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = 0) -> Probe:
    """Check one file fully (header, size, a complete decode) and decide how the shards store it.

    Kept byte for byte: JPEG and PNG in RGB or grayscale. Re-encoded as JPEG: other formats and modes
    (CMYK, palette, 16-bit, ...), and any image larger than `max_side` when it is given."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return Probe(skip="empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Probe(skip="not an image (unknown format)")
    except Exception as exc:  # noqa: BLE001  a damaged header can raise anything
        return Probe(skip=f"unreadable image header ({exc})")
    if img.size[0] * img.size[1] > max_pixels:
        return Probe(skip=f"too large ({img.size[0]}x{img.size[1]} > {max_pixels} pixels; raise --max-pixels to accept it)")
    h, w = _oriented_size(img)
    fmt, mode = img.format, img.mode
    try:
        img.load()  # a complete decode: truncated and corrupt files fail here
    except Exception as exc:  # noqa: BLE001
        return Probe(skip=f"truncated or corrupt ({exc})")
    if max_side and max(h, w) > max_side:
        h2, w2 = _scaled(h, w, max_side)
        return Probe(h2, w2, "jpg", note=f"downscaled from {w}x{h} to {w2}x{h2} (--max-side {max_side})")
    if fmt in ("JPEG", "PNG") and mode in ("RGB", "L"):
        return Probe(h, w, "jpg" if fmt == "JPEG" else "png")
    return Probe(h, w, "jpg", note=f"{mode} {fmt} re-encoded as RGB JPEG")


def shard_bytes(data: bytes, p: Probe, quality: int) -> bytes:
    """The bytes a shard stores for a probed sample: the original, or the converted JPEG."""
    if not p.note:
        return data
    img = open_image(data)
    if (img.height, img.width) != (p.height, p.width):
        img = img.resize((p.width, p.height), resample=3)  # BICUBIC; FFCV's writer uses INTER_AREA
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------- WebDataset shards
def shard_paths(root: str | os.PathLike[str], shard: int) -> tuple[Path, Path]:
    folder = Path(root) / SHARD_DIR
    return folder / f"{shard:06d}.tar", folder / f"{shard:06d}.idx"


class ShardWriter:
    """Writes one WebDataset tar and its DALI index (v1.2) under temporary names; `close` renames both
    (the index last, so a shard is complete exactly when its index file exists). Tars are reproducible:
    fixed mtime, owner and mode."""

    def __init__(self, tar_path: Path, idx_path: Path) -> None:
        self.tar_path, self.idx_path = tar_path, idx_path
        self._tmp = tar_path.with_name(tar_path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._lines: list[str] = []
        self.offsets: list[int] = []  # data offset of each sample's image in the tar

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        # the archive position is now past the data, padded to whole 512-byte blocks
        return self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)

    def add(self, index: int, label: int, image: bytes, ext: str) -> None:
        key = f"{index:09d}"
        parts = []
        for e, data in ((ext, image), ("cls", str(label).encode()),
                        ("meta", np.array([index, label], META_DTYPE).tobytes())):
            off, size = self._add(f"{key}.{e}", data)
            parts.append(f"{e} {off} {size} {key}.{e}")
            if e == ext:
                self.offsets.append(off)
        self._lines.append(" ".join(parts))

    def close(self) -> None:
        self._tar.close()
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        tmp_idx.write_text(f"v1.2 {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines))
        os.replace(self._tmp, self.tar_path)
        os.replace(tmp_idx, self.idx_path)


# ---------------------------------------------------------------------------- the dataset index
@dataclass
class DatasetIndex:
    """Per-sample facts the loaders and the box updater use without touching images."""

    labels: np.ndarray  # int64 (N,)
    heights: np.ndarray  # int32 (N,), after EXIF orientation and any --max-side downscale
    widths: np.ndarray  # int32 (N,)
    sources: np.ndarray  # bytes (N,): source path (or npz[split][i])
    shards: np.ndarray  # int32 (N,): -1 when no DALI shards were written
    offsets: np.ndarray  # int64 (N,): image data offset in its shard
    nbytes: np.ndarray  # int64 (N,): image bytes in its shard
    classes: list[str]
    checksums: np.ndarray | None = None  # uint32 (N,): sample_checksum of the image bytes in its shard (with shards)
    ffcv_checksums: np.ndarray | None = None  # uint32 (N,): of the image bytes stored in the FFCV file (with one)

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        buf = io.BytesIO()
        optional = {k: np.asarray(v, CHECKSUM_DTYPE) for k, v in
                    (("checksums", self.checksums), ("ffcv_checksums", self.ffcv_checksums)) if v is not None}
        np.savez(buf, labels=self.labels, heights=self.heights, widths=self.widths, sources=self.sources,
                 shards=self.shards, offsets=self.offsets, nbytes=self.nbytes, **optional)
        write_atomic(root / INDEX, buf.getvalue())
        write_atomic(root / CLASSES, "".join(f"{i}\t{c}\n" for i, c in enumerate(self.classes)))

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> DatasetIndex:
        root = Path(root)
        try:
            with np.load(root / INDEX, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            classes = [line.split("\t", 1)[1] for line in (root / CLASSES).read_text().splitlines() if line]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ViewpipeError(f"{root}: no readable viewpipe dataset index ({exc}); run `viewpipe convert` first") from None
        required = ("labels", "heights", "widths", "sources", "shards", "offsets", "nbytes")
        if missing := [k for k in required if k not in arrays]:
            raise ViewpipeError(f"{root / INDEX}: not a viewpipe dataset index (no {', '.join(missing)}); "
                                "run `viewpipe convert` again")
        optional = ("checksums", "ffcv_checksums")  # absent from indexes written before them
        return cls(classes=classes, **{k: arrays[k] for k in (*required, *optional) if k in arrays})
