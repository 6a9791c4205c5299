"""The key catalog of a shard set (keys and labels, read from tar headers and .cls members; no image decoded),
and the attacker's reference images taken from labelled shards."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

from .decode import IMAGE_EXTENSIONS
from .shards import ShardIndex, regular_members, sample_key


@dataclass(frozen=True)
class KeyEntry:
    key: str
    label: int  # -1 when the sample has no .cls
    shard: str


def scan_catalog(index: ShardIndex) -> list[KeyEntry]:
    """Every sample key in stream order with its label; unreadable tails end a shard (the stream counts them)."""
    entries: list[KeyEntry] = []
    for shard in index.shards:
        labels: dict[str, int] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard.url, mode="r:") as tar:
                for info in regular_members(tar):
                    key, ext = sample_key(info.name)
                    if key.startswith("__"):
                        continue
                    if not order or order[-1] != key:
                        order.append(key)
                    if ext == "cls":
                        member = tar.extractfile(info)
                        try:
                            labels[key] = int(member.read().decode("ascii").strip()) if member else -1
                        except (ValueError, UnicodeDecodeError):
                            labels[key] = -1
        except (tarfile.TarError, OSError, EOFError):
            pass
        entries.extend(KeyEntry(key, labels.get(key, -1), shard.url) for key in order)
    return entries


class ShardReferenceSource:
    """The attacker's pool of target-class images, drawn from labelled shards (``poisoning.ReferenceSource``)."""

    def __init__(self, index: ShardIndex, catalog: Sequence[KeyEntry] | None = None):
        self.index = index
        self.catalog = list(catalog) if catalog is not None else scan_catalog(index)

    def candidates(self, target_label: int) -> list[str]:
        return [entry.key for entry in self.catalog if entry.label == target_label]

    def load(self, keys: Sequence[str]) -> dict[str, bytes]:
        raw = load_raw_samples(self.index, keys)
        found = {
            key: next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
            for key, sample in raw.items()
            if any(ext in sample for ext in IMAGE_EXTENSIONS)
        }
        missing = set(keys) - set(found)
        if missing:
            raise ValueError(f"reference pool: {len(missing)} key(s) have no image in the shards, e.g. {min(missing)}")
        return found


def load_raw_samples(index: ShardIndex, keys: Sequence[str]) -> dict[str, dict[str, bytes | str]]:
    """The raw members of the named samples (``{"__key__", "jpg": ..., "cls": ...}``), read from the shards."""
    wanted = set(keys)
    found: dict[str, dict[str, bytes | str]] = {}
    for shard in index.shards:
        if len(found) == len(wanted):
            break
        with tarfile.open(shard.url, mode="r:") as tar:
            for info in regular_members(tar):
                key, ext = sample_key(info.name)
                if key in wanted:
                    member = tar.extractfile(info)
                    if member is not None:
                        found.setdefault(key, {"__key__": key})[ext] = member.read()
    return found
