"""img2dataset webdataset output validated and indexed in place (headers only; no shard is rewritten)."""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.faults import FaultCounter
from datamodules.shards import ShardIndex, ShardInfo, index_path_for, sample_key

from .writer import check_prefix

IMG2DATASET_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})


def index_img2dataset(
    src_dir: str | os.PathLike,
    *,
    prefix: str | None = None,
    trust_stats: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Validate img2dataset webdataset output (``00000.tar`` ... beside ``00000_stats.json``) and index it in place.

    Each tar's headers are read (no image is decoded, no shard is rewritten): the index counts the samples a
    loader will see; samples lacking an image or a caption are counted and reported; counts that differ from the
    ``successes`` of ``{shard}_stats.json`` are reported as mismatches (the scanned count goes in the index: it is
    what a loader will find). Shards that cannot be read to the end are left out of the index and reported.
    ``trust_stats=True`` skips the scan where a stats file exists and takes its ``successes`` as the count (fast
    on slow file systems, but nothing is validated). Writes ``src_dir/{prefix}.index.json`` (default ``train``).
    """
    started = time.perf_counter()
    prefix = check_prefix(prefix or "train")
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"img2dataset folder does not exist: {src}")
    index_file = index_path_for(src, prefix)
    if index_file.exists() and not overwrite:
        raise FileExistsError(f"{index_file} already exists: refusing to overwrite it (pass --overwrite to replace it)")
    tars = sorted(p for p in src.glob("*.tar") if re.fullmatch(r"\d+\.tar", p.name))
    if not tars:
        raise FileNotFoundError(f"{src} holds no img2dataset shards (00000.tar, 00001.tar, ...)")
    faults = FaultCounter()
    shards: list[ShardInfo] = []
    fields: set[str] = set()
    mismatches: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    for tar_path in tqdm(tars, desc="img2dataset index", unit="shard", disable=not progress, dynamic_ncols=True):
        expected = _stats_successes(tar_path, faults)
        if trust_stats and expected is not None:
            shards.append(ShardInfo(str(tar_path), expected))
            continue
        try:
            scan = _scan_img2dataset_shard(tar_path)
        except (tarfile.TarError, OSError, EOFError, _TruncatedShard) as exc:
            kind = "shard_truncated" if isinstance(exc, _TruncatedShard) else "shard_unreadable"
            faults.add(kind, f"{tar_path}: {exc}")
            unreadable.append({"shard": tar_path.name, "error": f"{kind}: {exc}"})
            continue
        for kind, n in scan.faults.items():
            faults.add(kind, n=n)
        fields.update(scan.fields)
        shards.append(ShardInfo(str(tar_path), scan.samples))
        if expected is not None and expected != scan.samples:
            mismatches.append({"shard": tar_path.name, "stats_successes": expected, "scanned": scan.samples})
    if not shards:
        raise ValueError(f"{src}: none of the {len(tars)} shard(s) could be read")
    skipped = {k: v for k, v in faults.as_dict().items() if v}
    source = {
        "converter": "img2dataset",
        "path": str(src.resolve()),
        "options": {"prefix": prefix, "trust_stats": trust_stats},
        "problems": skipped,
        "stats_mismatches": mismatches,
        "unreadable_shards": unreadable,
    }
    index = ShardIndex(shards=shards, classes=None, source=source, fields=sorted(fields))
    index.save(index_file)
    written = index.total
    report = {
        "converter": "img2dataset",
        "out": str(src),
        "splits": {
            prefix: {
                "written": written,
                "shards": len(shards),
                "index": str(index_file),
                "per_class": None,
                "skipped": skipped,
                "converted": {},
                "stats_mismatches": mismatches,
                "unreadable_shards": unreadable,
            }
        },
        "written": written,
        "skipped": skipped,
        "converted": {},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return report


class _TruncatedShard(ValueError):
    """A tar that ends inside a member or right after one (a copy cut short)."""


@dataclass
class _ShardScan:
    samples: int = 0
    fields: set[str] = field(default_factory=set)
    faults: Counter[str] = field(default_factory=Counter)


def _scan_img2dataset_shard(path: Path) -> _ShardScan:
    """Read a tar's headers only: samples, their extensions, image/caption presence, truncation."""
    scan = _ShardScan()
    size = path.stat().st_size
    members: dict[str, dict[str, int]] = {}
    order: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        while True:
            info = tar.next()
            if info is None:
                break
            tar.members = []  # keep memory flat on big shards
            if not info.isreg():
                continue
            if info.offset_data + info.size > size:
                raise _TruncatedShard(f"member {info.name} ends past the end of the file")
            key, ext = sample_key(info.name)
            if key.startswith("__") and key.endswith("__"):
                continue
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][ext.lower()] = info.size
        if size - tar.offset < tarfile.BLOCKSIZE:  # cut right after a member: no end-of-archive block
            raise _TruncatedShard("the file ends after a member, without the end-of-archive marker")
    for key in order:
        exts = members[key]
        scan.samples += 1
        scan.fields.update(exts)
        if not any(e in IMG2DATASET_IMAGE_EXTENSIONS for e in exts):
            scan.faults["image_missing"] += 1
        if not exts.get("txt"):
            scan.faults["caption_missing"] += 1
    return scan


def _stats_successes(tar_path: Path, faults: FaultCounter) -> int | None:
    stats_path = tar_path.with_name(f"{tar_path.stem}_stats.json")
    if not stats_path.exists():
        return None
    try:
        stats = json.loads(stats_path.read_text())
        return int(stats["successes"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        faults.add("stats_unreadable", f"{stats_path}: {exc!r}")
        return None
