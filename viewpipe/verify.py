"""`verify`: re-read everything a conversion wrote and name every damaged sample (`Damaged`).

The rule: every sample of the DALI shards is read as DALI reads it (its index line, tar headers, .meta and .cls
members, offsets) and the FFCV file through its own tables (sizes, labels, data pointers); the image bytes are
checked against the checksums the conversion stored in the index, or, for an index written before checksums,
decoded. Each problem is one line naming the sample (index, shard key, source file) or the file.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from viewpipe.beton import beton_checksums
from viewpipe.errors import ViewpipeError, import_optional
from viewpipe.formats import BETON, REPORT, DatasetIndex, open_image, sample_checksum, shard_paths
from viewpipe.workers import progress


class Damaged(ViewpipeError):
    """`verify` found damage: `problems` holds one line per damaged sample (or shard, or file)."""

    def __init__(self, dst: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{dst}: {len(problems)} damaged samples or files (each named above); convert again")


def verify(dst: str | os.PathLike[str]) -> dict:
    """Re-read everything a conversion wrote and check it: counts, labels, sizes, and every sample's bytes
    against the checksums the conversion stored (indexes written before checksums: a full decode instead).
    Raises `Damaged`, naming every damaged sample (index, source, shard or file), or returns the counts."""
    dst = Path(dst)
    report_path = dst / REPORT
    if not report_path.exists() or not json.loads(report_path.read_text()).get("complete"):
        raise ViewpipeError(f"{dst}: not a finished conversion (no complete {REPORT}); run or resume `viewpipe convert`")
    report = json.loads(report_path.read_text())
    index = DatasetIndex.load(dst)
    n = len(index)
    if report["samples_written"] != n:
        raise ViewpipeError(f"{dst}: the report says {report['samples_written']} samples but the index has {n}")
    out: dict[str, Any] = {"samples": n}
    problems: list[str] = []
    if "dali" in report["options"]["formats"]:
        out["dali"] = _verify_shards(dst, index, problems)
    if "ffcv" in report["options"]["formats"]:
        out["ffcv"] = _verify_beton(dst, index, problems)
    if problems:
        raise Damaged(dst, problems)
    return out


def _sample_name(index: DatasetIndex, k: int, shard: bool = False) -> str:
    """"sample K (its shard key, from its source file)": what --verify names a damaged sample by."""
    key = f"{k:09d}, " if shard else ""
    return f"sample {k} ({key}from {index.sources[k].decode(errors='replace')})"


def _tar_header(mm: mmap.mmap, off: int) -> tuple[str, int] | None:
    """(name, size) of the ustar header in the 512 bytes before a member's data, None if it is damaged."""
    import tarfile

    if off < tarfile.BLOCKSIZE or off > len(mm):
        return None
    block = mm[off - tarfile.BLOCKSIZE : off]
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return None
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):  # the checksum field counts as spaces
        return None
    return block[:100].split(b"\0", 1)[0].decode(errors="replace"), size


def _verify_shards(dst: Path, index: DatasetIndex, problems: list[str]) -> int:
    """Every sample of every shard, through its DALI index lines (as DALI reads them): the tar headers, the
    .meta and .cls members, the offsets, and the image bytes' checksum (or a decode for an old index)."""
    seen = 0
    for s in progress(iter(sorted(set(index.shards.tolist()))), None, "verify dali", "shard"):  # type: ignore[arg-type]
        tar_path, idx_path = shard_paths(dst, s)
        rows = np.flatnonzero(index.shards == s)
        span = f"samples {rows[0]}..{rows[-1]}" if len(rows) > 1 else f"sample {rows[0]}"
        try:
            lines = idx_path.read_text().splitlines()
            f = open(tar_path, "rb")
        except (OSError, UnicodeDecodeError) as exc:
            what = getattr(exc, "strerror", None) or exc
            problems.append(f"{getattr(exc, 'filename', None) or idx_path}: cannot read the shard ({what}); "
                            f"{span} lost; convert again")
            continue
        if not lines or lines[0] != f"v1.2 {len(rows)}" or len(lines) != len(rows) + 1:
            problems.append(f"{idx_path}: expected 'v1.2 {len(rows)}' and {len(rows)} lines, found "
                            f"{(lines or [''])[0][:40]!r} and {max(0, len(lines) - 1)}; {span} unreadable; convert again")
            f.close()
            continue
        with f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
            for k, line in zip(rows.tolist(), lines[1:]):
                problem = _check_shard_sample(mm, index, k, line)  # type: ignore[arg-type]
                if problem:
                    problems.append(f"{tar_path}: {_sample_name(index, k, shard=True)} {problem}; convert again")
                seen += 1
            if isinstance(mm, mmap.mmap):
                mm.close()
    if seen != len(index) and not problems:  # (a lost or damaged shard is named above)
        problems.append(f"{dst}: the shards hold {seen} samples, the index {len(index)}; convert again")
    return seen


def _check_shard_sample(mm: mmap.mmap, index: DatasetIndex, k: int, line: str) -> str:
    """What is wrong with sample k of a shard (empty if nothing): its index line, tar headers, members, bytes."""
    parts = line.split()
    members = _shard_members(mm, f"{k:09d}", parts, line)
    if isinstance(members, str):
        return members
    image_ext = next((e for e in ("jpg", "png") if e in members), None)
    if image_ext is None or "meta" not in members or "cls" not in members:
        return f"lacks members (has {', '.join(sorted(members))})"
    image = members[image_ext]
    at = parts.index(image_ext)
    if (int(parts[at + 1]), len(image)) != (index.offsets[k], index.nbytes[k]):
        return "is not where the index says"
    if len(members["meta"]) != 16:
        return f"has a damaged .meta ({len(members['meta'])} bytes)"
    meta = np.frombuffer(members["meta"], "<i8")
    try:
        cls = int(members["cls"])
    except ValueError:
        return f"has a damaged .cls ({members['cls'][:20]!r})"
    if (meta[0], meta[1], cls) != (k, index.labels[k], index.labels[k]):
        return f"carries index/label {meta.tolist()}, {cls}; the index says {k}, {index.labels[k]}"
    return _check_image_bytes(image, index, k)


def _shard_members(mm: mmap.mmap, key: str, parts: list[str], line: str) -> dict[str, bytes] | str:
    """The members (extension → bytes) of the sample `key` whose index line is `parts`, each checked against
    its tar header; or what is wrong with them."""
    if len(parts) % 4 or not parts:
        return f"has a damaged index line ({line[:60]!r})"
    members: dict[str, bytes] = {}
    for j in range(0, len(parts), 4):
        ext, off_s, size_s, name = parts[j : j + 4]
        if not (off_s.isdigit() and size_s.isdigit()):
            return f"has a damaged index line ({line[:60]!r})"
        off, size = int(off_s), int(size_s)
        if name != f"{key}.{ext}":
            return f"is indexed as {name!r}, expected {key}.{ext}"
        if off + size > len(mm):
            return f"is cut short: .{ext} ends at byte {off + size}, the shard has {len(mm)}"
        header = _tar_header(mm, off)
        if header is None:
            return f"has a damaged tar header before its .{ext} (byte {off - 512})"
        if header != (name, size):
            return f"has a tar header for {header[0]!r} ({header[1]} bytes) where {name} ({size} bytes) should be"
        members[ext] = mm[off : off + size]
    return members


def _check_image_bytes(image: bytes, index: DatasetIndex, k: int) -> str:
    """What is wrong with sample k's image bytes: their checksum against the index's, or (an index written
    before checksums) whether they decode to the size the index says."""
    if index.checksums is not None:
        got = sample_checksum(image)
        if got != int(index.checksums[k]):
            return (f"has damaged image bytes (checksum {got:08x}, written {int(index.checksums[k]):08x}; "
                    f"{len(image)} bytes at byte {index.offsets[k]})")
        return ""
    try:  # an index written before checksums: decode
        img = open_image(image)
    except Exception as exc:  # noqa: BLE001
        return f"does not decode ({type(exc).__name__}: {exc})"
    if (img.height, img.width) != (index.heights[k], index.widths[k]):
        return f"decodes to {img.width}x{img.height}, the index says {index.widths[k]}x{index.heights[k]}"
    return ""


def _verify_beton(dst: Path, index: DatasetIndex, problems: list[str]) -> int:
    import_optional("ffcv", "ffcv", "FFCV")
    from ffcv.reader import Reader

    path = dst / BETON
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        reader = Reader(str(path))
    except Exception as exc:  # noqa: BLE001  a damaged header or table can raise anything
        problems.append(f"{path}: not a readable FFCV file ({type(exc).__name__}: {exc}); convert again")
        return 0
    if reader.num_samples != len(index) or reader.field_names[:2] != ["image", "label"]:
        problems.append(f"{path}: holds {reader.num_samples} samples ({reader.field_names}), the index "
                        f"{len(index)}; convert again")
        return 0
    image = reader.metadata["f0"]  # fields are stored by position: f0 image, f1 label
    if not (np.array_equal(image["height"], index.heights) and np.array_equal(image["width"], index.widths)):
        bad = np.flatnonzero((image["height"] != index.heights) | (image["width"] != index.widths))
        problems.extend(f"{path}: {_sample_name(index, k)} is stored as {image['width'][k]}x{image['height'][k]}, "
                        f"the index says {index.widths[k]}x{index.heights[k]}; convert again" for k in bad[:100])
    if index.ffcv_checksums is None:  # an index written before checksums: decode every sample
        _decode_beton(path, index, problems)
        return len(index)
    labels = reader.metadata["f1"]
    for k in np.flatnonzero(labels != index.labels)[:100]:
        problems.append(f"{path}: {_sample_name(index, k)} carries label {labels[k]}, the index says "
                        f"{index.labels[k]}; convert again")
    try:
        got = beton_checksums(path, len(index), reader)
    except ViewpipeError as exc:
        problems.append(str(exc))
        return 0
    table = reader.alloc_table
    ptrs = dict(zip(table["sample_id"].tolist(), table["ptr"].tolist()))
    for k in range(len(index)):
        if ptrs.get(k) != int(image["data_ptr"][k]):
            problems.append(f"{path}: {_sample_name(index, k)} has a damaged data pointer; convert again")
        elif got[k] != index.ffcv_checksums[k]:
            problems.append(f"{path}: {_sample_name(index, k)} has damaged image bytes (checksum {int(got[k]):08x}, "
                            f"written {int(index.ffcv_checksums[k]):08x}; at byte {ptrs[k]}); convert again")
    return len(index)


def _decode_beton(path: Path, index: DatasetIndex, problems: list[str]) -> None:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]})
    labels = []
    for _, lab in progress(iter(loader), len(loader), "verify ffcv", "batch"):
        labels.append(np.asarray(lab).reshape(-1))
    got = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if not np.array_equal(got, index.labels):
        problems.append(f"{path}: labels read back differ from the index; convert again")
