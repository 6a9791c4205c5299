"""What every converter shares: keys, the overwrite check, writing one split through ``ShardSink``, the report."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.faults import FaultCounter
from datamodules.shards import INDEX_SUFFIX, ShardSink, index_path_for

from .images import ImageLimits, SkipSample, prepare_image

DEFAULT_MAXCOUNT = 10000
_KEY_UNSAFE = re.compile(r"[^\w-]")
_PREFIX_OK = re.compile(r"[\w-]+")


def sanitize_key(text: str) -> str:
    """A key part with '.', '/', spaces and other separators replaced by '_' (letters of any script stay)."""
    return _KEY_UNSAFE.sub("_", text)


class KeyMaker:
    """Unique keys ``{prefix}_{name}``; a name that collides after sanitising gets ``_1``, ``_2``, ... appended."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.used: set[str] = set()
        self.renamed = 0

    def __call__(self, name: str) -> str:
        base = f"{sanitize_key(self.prefix)}_{sanitize_key(name)}"
        key, n = base, 0
        while key in self.used:
            n += 1
            key = f"{base}_{n}"
        self.renamed += n > 0
        self.used.add(key)
        return key


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_OK.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be non-empty and hold only letters, digits, '_' and '-'")
    return prefix


def check_output_free(out: str | os.PathLike, prefixes: Iterable[str], overwrite: bool) -> None:
    """Fail before any work when a shard set of one of ``prefixes`` exists in ``out`` (unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    if overwrite or not out.is_dir():
        return
    for prefix in prefixes:
        existing = sorted(out.glob(f"{prefix}-[0-9]*.tar")) + [p for p in [index_path_for(out, prefix)] if p.exists()]
        if existing:
            raise FileExistsError(
                f"{existing[0]} already exists: refusing to overwrite the shard set {prefix!r} in {out} "
                "(pass --overwrite to replace it)"
            )


@dataclass
class SourceSample:
    """One sample to write; ``load`` returns the encoded image bytes (read lazily, in order)."""

    key: str
    load: Callable[[], bytes]
    label: int | None = None
    caption: str | None = None
    meta: dict[str, Any] | None = None
    name: str = ""  # the source path, for messages
    encoded: bool = True  # False: ``load`` returns PNG bytes made by the converter itself (CIFAR arrays)


@dataclass
class SplitResult:
    prefix: str
    written: int = 0
    shards: int = 0
    index: str = ""
    classes: list[str] | None = None
    class_counts: list[int] | None = None
    faults: FaultCounter = field(default_factory=FaultCounter)

    def as_dict(self) -> dict[str, Any]:
        counts = {k: v for k, v in self.faults.as_dict().items() if v}
        converted = {k: counts.pop(k) for k in list(counts) if k in _CONVERSION_KINDS}
        per_class = None
        if self.classes is not None and self.class_counts is not None:
            per_class = dict(zip(self.classes, self.class_counts))
        return {
            "written": self.written,
            "shards": self.shards,
            "index": self.index,
            "per_class": per_class,
            "skipped": counts,
            "converted": converted,
        }


_CONVERSION_KINDS = ("color_converted", "format_converted", "key_renamed")


@dataclass(frozen=True)
class SplitWriter:
    """Where and how a converter writes its splits: the output folder, samples per shard, the overwrite rule and the
    image checks. One per conversion; it also makes the options a shard set's index records and the report."""

    out: str | os.PathLike
    maxcount: int
    overwrite: bool
    limits: ImageLimits
    progress: bool

    def options(self) -> dict[str, Any]:
        """The settings every converter records under ``source.options`` of its index."""
        return {"maxcount": self.maxcount, "min_side": self.limits.min_side, "max_pixels": self.limits.max_pixels}

    def check_free(self, prefixes: Iterable[str]) -> None:
        check_output_free(self.out, prefixes, self.overwrite)

    def write(
        self,
        prefix: str,
        samples: Sequence[SourceSample],
        *,
        classes: Sequence[str] | None,
        source: dict[str, Any],
        faults: FaultCounter | None = None,
    ) -> SplitResult:
        """Check and write ``samples`` (already in their final order) as the shard set ``prefix`` in ``out``."""
        out, limits = self.out, self.limits
        result = SplitResult(prefix, classes=list(classes) if classes is not None else None)
        if faults is not None:
            result.faults = faults
        if not samples:
            skipped = {k: v for k, v in result.faults.as_dict().items() if v}
            raise ValueError(
                f"{source.get('path') or source.get('images') or out}: no sample to write for {prefix!r}"
                + (f" (skipped: {skipped})" if skipped else " (the source is empty)")
            )
        sink = ShardSink(out, prefix, maxcount=self.maxcount, overwrite=self.overwrite, classes=classes, source=source)
        with sink:
            for sample in tqdm(
                samples,
                desc=f"{source.get('converter', 'convert')} {prefix}",
                unit="img",
                disable=not self.progress,
                dynamic_ncols=True,
            ):
                try:
                    members = _sample_members(sample, limits, result.faults)
                except SkipSample as exc:
                    result.faults.add(exc.reason, f"{sample.name or sample.key}: {exc.detail}"[:500])
                    continue
                sink.write(sample.key, members)
            sink.source["counts"] = {k: v for k, v in result.faults.as_dict().items() if v}
        result.written = sink.count
        result.shards = len(sink.shards)
        result.index = str(index_path_for(out, prefix))
        result.class_counts = sink.class_counts
        return result

    def report(self, converter: str, results: Sequence[SplitResult], started: float) -> dict[str, Any]:
        """The report every converter returns (see the package's docstring)."""
        splits = {r.prefix: r.as_dict() for r in results}
        skipped: Counter[str] = Counter()
        converted: Counter[str] = Counter()
        for split in splits.values():
            skipped.update(split["skipped"])
            converted.update(split["converted"])
        return {
            "converter": converter,
            "out": str(Path(self.out)),
            "splits": splits,
            "written": sum(s["written"] for s in splits.values()),
            "skipped": dict(sorted(skipped.items())),
            "converted": dict(sorted(converted.items())),
            "seconds": round(time.perf_counter() - started, 3),
        }


def _sample_members(sample: SourceSample, limits: ImageLimits, faults: FaultCounter) -> dict[str, bytes | str | int]:
    try:
        data = sample.load()
    except OSError as exc:
        raise SkipSample("file_unreadable", repr(exc)) from None
    if sample.encoded:
        image = prepare_image(data, limits)
        if image.converted:
            faults.add(image.converted)
        members: dict[str, bytes | str | int] = {image.ext: image.data}
    else:
        members = {"png": data}
    if sample.label is not None:
        members["cls"] = int(sample.label)
    if sample.caption is not None:
        members["txt"] = sample.caption
    if sample.meta is not None:
        members["json"] = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True)
    return members


def iter_index_files(path: str | os.PathLike) -> Iterator[Path]:
    """Index files at ``path``: the file itself, or every ``*.index.json`` in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        yield from sorted(path.glob(f"*{INDEX_SUFFIX}"))
    elif path.exists():
        yield path
