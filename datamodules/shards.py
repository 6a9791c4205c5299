"""Shard sets on disk: the index file, resolving what a user names into shards, writing new shards safely.

A shard set is ``{prefix}-NNNNNN.tar`` files plus ``{prefix}.index.json`` beside them. The index holds the
per-shard sample counts, class names and the source, so loaders know sizes without scanning the tars.
"""

from __future__ import annotations

import datetime as _dt
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

INDEX_FORMAT = "clbd-shards/1"
INDEX_SUFFIX = ".index.json"


class ShardSpecError(ValueError):
    """A shard set a user named cannot be used; the message names the path or number."""


@dataclass
class ShardInfo:
    url: str
    count: int


@dataclass
class ShardIndex:
    """What a loader needs to know about a shard set before reading it."""

    shards: list[ShardInfo]
    classes: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    class_counts: list[int] | None = None
    created: str = ""
    counted_from: str = "index"  # "index" or "scan" (no index file: counted by reading tar headers)

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    def to_json(self, base: Path) -> dict[str, Any]:
        """Serialise with shard names relative to the index's folder, so a shard set can be moved."""
        shards = [{"name": os.path.relpath(s.url, base), "count": s.count} for s in self.shards]
        return {
            "format": INDEX_FORMAT,
            "total": self.total,
            "shards": shards,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "fields": self.fields,
            "source": self.source,
            "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(path.parent), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardIndex:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardSpecError(f"index file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ShardSpecError(f"index file {path} is not valid JSON: {exc}") from None
        if raw.get("format") != INDEX_FORMAT:
            raise ShardSpecError(f"index file {path} has format {raw.get('format')!r}, expected {INDEX_FORMAT!r}")
        shards = [ShardInfo(str(path.parent / s["name"]), int(s["count"])) for s in raw["shards"]]
        return cls(
            shards=shards,
            classes=raw.get("classes"),
            source=raw.get("source") or {},
            fields=raw.get("fields") or [],
            class_counts=raw.get("class_counts"),
            created=raw.get("created", ""),
        )


def index_path_for(shard_dir: str | os.PathLike, prefix: str) -> Path:
    return Path(shard_dir) / f"{prefix}{INDEX_SUFFIX}"


def shard_pattern(shard_dir: str | os.PathLike, prefix: str) -> str:
    return str(Path(shard_dir) / f"{prefix}-%06d.tar")


def resolve_shards(spec: str | os.PathLike | Sequence[str], *, name: str = "shards") -> ShardIndex:
    """Turn what a user wrote into a ShardIndex, or fail naming the path.

    Accepted: an index file (``train.index.json``); a folder holding exactly one index (or tars, no index);
    a brace pattern or glob of tar paths (``dir/train-{000000..000009}.tar``); a list of tar paths.
    Tars named without an index beside them are counted by reading tar headers (no image is decoded).
    """
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
        if not urls:
            raise ShardSpecError(f"{name}: the shard list is empty")
        return _index_from_tars(urls, name)
    spec = str(spec)
    if not spec:
        raise ShardSpecError(f"{name}: no shard path given")
    path = Path(spec)
    if spec.endswith(INDEX_SUFFIX) or (path.is_file() and spec.endswith(".json")):
        index = ShardIndex.load(path)
        missing = [s.url for s in index.shards if not os.path.exists(s.url)]
        if missing:
            raise ShardSpecError(
                f"{name}: index {path} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}"
            )
        if not index.shards:
            raise ShardSpecError(f"{name}: index {path} lists no shards")
        return index
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) == 1:
            return resolve_shards(str(indexes[0]), name=name)
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise ShardSpecError(f"{name}: folder {path} holds several shard sets ({names}); name one index file")
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise ShardSpecError(f"{name}: folder {path} holds no .tar shards and no {INDEX_SUFFIX}")
        return _index_from_tars(tars, name)
    if any(ch in spec for ch in "{*?["):
        urls = [u for pattern in braceexpand.braceexpand(spec) for u in (sorted(glob.glob(pattern)) or [pattern])]
        existing = [u for u in urls if os.path.exists(u)]
        if not existing:
            raise ShardSpecError(f"{name}: the pattern {spec} matches no file")
        if len(existing) < len(urls):
            missing = [u for u in urls if not os.path.exists(u)]
            raise ShardSpecError(f"{name}: the pattern {spec} names {len(missing)} missing shard(s), e.g. {missing[0]}")
        return _index_from_tars(existing, name)
    if path.is_file():
        return _index_from_tars([spec], name)
    raise ShardSpecError(f"{name}: path does not exist: {spec}")


def _index_from_tars(urls: list[str], name: str) -> ShardIndex:
    """Counts from an index beside the tars when one covers them all; else from tar headers."""
    for url in urls:
        if not os.path.exists(url):
            raise ShardSpecError(f"{name}: shard does not exist: {url}")
    for candidate in {str(Path(u).parent) for u in urls}:
        for index_file in Path(candidate).glob(f"*{INDEX_SUFFIX}"):
            try:
                index = ShardIndex.load(index_file)
            except ShardSpecError:
                continue
            counts = {os.path.abspath(s.url): s.count for s in index.shards}
            if all(os.path.abspath(u) in counts for u in urls):
                index.shards = [ShardInfo(u, counts[os.path.abspath(u)]) for u in urls]
                index.class_counts = None  # describes the whole set, not this selection
                return index
    return ShardIndex(shards=[ShardInfo(u, count_samples(u)) for u in urls], counted_from="scan")


def regular_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Regular-file headers in order; on a seekable file tarfile seeks past the data instead of reading it."""
    while True:
        info = tar.next()
        if info is None:
            return
        tar.members = []  # keep memory flat on big shards
        if info.isreg():
            yield info


def iter_member_names(url: str) -> Iterator[tarfile.TarInfo]:
    with tarfile.open(url, mode="r:") as tar:
        yield from regular_members(tar)


def sample_key(member_name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``), webdataset's key/extension rule."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


@dataclass
class ShardRead:
    """How reading one shard went: whole samples delivered, and why it stopped early (None: it did not)."""

    url: str
    samples: int = 0
    error: str | None = None
    cut: bool = False  # a sample was being read when the tar broke off; it was dropped


def read_samples(url: str, outcome: ShardRead) -> Iterator[dict[str, Any]]:
    """The samples of one tar (members grouped by webdataset's key rule), read front to back in one stream.

    A tar that breaks off (truncated, corrupt, empty, not a tar at all) ends the shard there: ``outcome`` says
    so, and the sample being read when it broke is dropped, since some of its members are lost.
    """
    current: dict[str, Any] | None = None
    try:
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # keep memory flat on big shards
                if not info.isreg():
                    continue
                key, ext = sample_key(info.name)
                if not ext or key.rsplit("/", 1)[-1].startswith("__"):
                    continue  # no extension, or webdataset's __meta__ members
                if current is not None and key != current["__key__"]:
                    outcome.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                data = tar.extractfile(info).read()
                current.setdefault(ext.lower(), data)  # a repeated member name keeps the first
    except Exception as exc:  # tarfile, gzip, zlib and OS errors all mean "the rest of this shard is lost"
        outcome.error = f"{type(exc).__name__}: {exc}"[:300]
        outcome.cut = current is not None
        return
    if current is not None:
        outcome.samples += 1
        yield current


def count_samples(url: str) -> int:
    """Number of distinct keys in a tar (corrupt tails count up to where the tar stays readable)."""
    keys = 0
    last = None
    try:
        for info in iter_member_names(url):
            key, _ = sample_key(info.name)
            if key.startswith("__") and key.endswith("__"):
                continue
            if key != last:
                keys += 1
                last = key
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


class ShardSink:
    """Writes ``{prefix}-NNNNNN.tar`` shards of at most ``maxcount`` samples, then the index.

    Refuses to start when shards or the index of that prefix already exist, unless ``overwrite``: a user's
    earlier conversion is never replaced silently. Members are written in key order with fixed metadata
    (mtime 0, root owner) so the same input gives byte-identical shards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        *,
        maxcount: int = 10000,
        overwrite: bool = False,
        classes: Sequence[str] | None = None,
        source: dict[str, Any] | None = None,
    ):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.maxcount = maxcount
        self.classes = list(classes) if classes is not None else None
        self.source = dict(source or {})
        existing = sorted(self.out_dir.glob(f"{prefix}-[0-9]*.tar"))
        index_file = index_path_for(self.out_dir, prefix)
        if (existing or index_file.exists()) and not overwrite:
            first = existing[0] if existing else index_file
            raise FileExistsError(
                f"{first} already exists: refusing to overwrite the shard set {prefix!r} in {self.out_dir} "
                "(pass --overwrite to replace it)"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in existing:
            old.unlink()
        self.shards: list[ShardInfo] = []
        self.fields: set[str] = set()
        self.class_counts = [0] * len(self.classes) if self.classes else None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._seen: set[str] = set()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(write_index=exc_type is None)

    def write(self, key: str, members: dict[str, bytes | str | int]) -> None:
        """One sample: ``members`` maps extension (``jpg``, ``cls``, ``txt``, ``json``) to its content."""
        if not key or "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} must be non-empty and hold no '.' in its last part")
        if key in self._seen:
            raise ValueError(f"duplicate sample key {key!r}")
        self._seen.add(key)
        if self._tar is None or self._in_shard >= self.maxcount:
            self._open_next()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            if isinstance(data, int):
                data = str(data)
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = "root"
            self._tar.addfile(info, io.BytesIO(data))
            self.fields.add(ext)
        if "cls" in members and self.class_counts is not None:
            label = int(members["cls"])
            if 0 <= label < len(self.class_counts):
                self.class_counts[label] += 1
        self._in_shard += 1
        self.shards[-1].count += 1

    def _open_next(self) -> None:
        if self._tar is not None:
            self._tar.close()
        url = str(self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        self._tar = tarfile.open(url, mode="w")
        self.shards.append(ShardInfo(url, 0))
        self._in_shard = 0

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def index(self) -> ShardIndex:
        return ShardIndex(
            shards=list(self.shards),
            classes=self.classes,
            source=self.source,
            fields=sorted(self.fields),
            class_counts=self.class_counts,
        )

    def close(self, write_index: bool = True) -> ShardIndex:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        index = self.index()
        if write_index:
            index.save(index_path_for(self.out_dir, self.prefix))
        return index


def describe(index: ShardIndex) -> dict[str, Any]:
    out = asdict(index)
    out["total"] = index.total
    out["shards"] = len(index.shards)
    return out
