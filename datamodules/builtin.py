"""``builtin:NAME/SPLIT`` shard specs: the embedded default dataset, generated on first use (no download)."""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("shapes",)


def cache_root() -> Path:
    """Where generated datasets live: ``$CLBD_DATA_CACHE`` or ``~/.cache/clbd``."""
    return Path(os.environ.get("CLBD_DATA_CACHE") or Path.home() / ".cache" / "clbd")


def resolve_builtin(spec: str) -> str:
    """``builtin:shapes/train`` -> the path of that split's index file (generating the dataset if needed)."""
    if not isinstance(spec, str) or not spec.startswith(BUILTIN_PREFIX):
        return spec
    name, _, split = spec[len(BUILTIN_PREFIX) :].partition("/")
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"{spec}: unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    from .synthetic import ensure_shapes

    folder = ensure_shapes(cache_root() / name)
    index = folder / f"{split or 'train'}.index.json"
    if not index.exists():
        splits = sorted(p.name.removesuffix(".index.json") for p in folder.glob("*.index.json"))
        raise ValueError(f"{spec}: built-in dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")
    return str(index)
