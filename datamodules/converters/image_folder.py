"""Class-folder layouts (``<class>/<image>``, ImageNet-style, CIFAR-10 as JPEGs) as a folder or an archive."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.faults import FaultCounter

from .file_tree import FileTree, clean_member_name
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits
from .writer import DEFAULT_MAXCOUNT, KeyMaker, SourceSample, SplitWriter, check_prefix

# Folders named exactly like CIFAR-10's classes get its official label order, not the sorted one.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm", "jfif"})


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _extension(rel: str) -> str:
    return rel.rpartition(".")[2].lower() if "." in rel.rpartition("/")[2] else ""


@dataclass
class ClassFiles:
    """Files of one split grouped by class folder, plus what did not fit the layout."""

    by_class: dict[str, list[str]] = field(default_factory=dict)
    faults: FaultCounter = field(default_factory=FaultCounter)


def group_by_class(tree: FileTree, root: str) -> ClassFiles:
    """``root/<class>/.../name.ext`` -> by class (empty class folders included); hidden files, non-images and
    files outside a class folder are counted."""
    grouped = ClassFiles()
    start = f"{root}/" if root else ""
    for folder in tree.dirs():
        if folder.startswith(start) and "/" not in folder[len(start) :] and not _is_hidden(folder[len(start) :]):
            grouped.by_class.setdefault(folder[len(start) :], [])
    for rel in tree.files():
        if not rel.startswith(start):
            continue
        inner = rel[len(start) :]
        if _is_hidden(inner):
            grouped.faults.add("hidden_file", f"{rel}: hidden file")
            continue
        class_name, sep, _ = inner.partition("/")
        if not sep:
            grouped.faults.add("not_in_class_folder", f"{rel}: not inside a class folder")
            continue
        if _extension(rel) not in IMAGE_EXTENSIONS:
            grouped.faults.add("not_image_file", f"{rel}: not an image file name")
            continue
        grouped.by_class[class_name].append(rel)
    return grouped


def class_samples(
    tree: FileTree, grouped: ClassFiles, root: str, classes: Sequence[str], prefix: str, shuffle_seed: int | None
) -> list[SourceSample]:
    """Samples of every listed class, keys from the path inside the class root.

    Sorted by path, then (unless ``shuffle_seed`` is None) put in a seeded random order: class-sorted shards would
    give a streaming loader's shuffle buffer one or two classes at a time.
    """
    keys = KeyMaker(prefix)
    samples = []
    start = f"{root}/" if root else ""
    rels = sorted((rel, classes.index(name)) for name, items in grouped.by_class.items() for rel in items)
    for rel, label in rels:
        stem = rel[len(start) :].rpartition(".")[0]
        samples.append(SourceSample(keys(stem), _loader(tree, rel), label=label, name=rel))
    if keys.renamed:
        grouped.faults.add("key_renamed", n=keys.renamed)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples


def _loader(tree: FileTree, rel: str) -> Callable[[], bytes]:
    return lambda: tree.read(rel)


def class_order(names: Iterable[str], classes: Sequence[str] | None, where: str) -> list[str]:
    found = sorted(set(names))
    if classes is not None:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{where}: class folder(s) {unknown} are not in the given classes {classes}")
        return classes
    if not found:
        raise ValueError(f"{where}: no class folders found (expected <class>/<image> inside)")
    if set(found) == set(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    return found


def convert_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "train",
    subdir: str | None = None,
    classes: Sequence[str] | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    maxcount: int = DEFAULT_MAXCOUNT,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """A folder (or tar archive) with one sub-folder per class -> the shard set ``prefix`` in ``out``.

    Class indices follow ``classes`` when given (use the train split's list for val/test, where a class may be
    absent); otherwise the sorted folder names (CIFAR-10's official order when the names are exactly CIFAR-10's).
    ``subdir`` picks a folder inside ``src`` that holds the class folders (e.g. ``train`` of an archive; ``"."``
    for the root as is); by default an archive's single top-level folder is entered. Files are taken in sorted path
    order, then shuffled with ``shuffle_seed`` (None: keep sorted order) so that every shard mixes the classes.
    Keys are ``{prefix}_{class}_{path}`` with separators replaced by ``_``.
    """
    started = time.perf_counter()
    check_prefix(prefix)
    writer = SplitWriter(out, maxcount, overwrite, ImageLimits(min_side, max_pixels), progress)
    writer.check_free([prefix])
    with FileTree(src) as tree:
        files = tree.files()
        if subdir is not None:
            root = clean_member_name(subdir)
        else:
            root = _unwrap_single_folder(files) if tree.kind == "archive" else ""
        if root and root not in tree.dirs():
            raise FileNotFoundError(f"{src}: has no folder {root!r}")
        grouped = group_by_class(tree, root)
        order = class_order(grouped.by_class, classes, f"{src}")
        samples = class_samples(tree, grouped, root, order, prefix, shuffle_seed)
        source = {
            "converter": "image_folder",
            "path": str(Path(src).resolve()),
            "options": {
                "prefix": prefix,
                "subdir": subdir,
                "classes": classes and list(classes),
                "shuffle_seed": shuffle_seed,
                **writer.options(),
            },
        }
        result = writer.write(prefix, samples, classes=order, source=source, faults=grouped.faults)
    return writer.report("image_folder", [result], started)


def _unwrap_single_folder(files: Sequence[str]) -> str:
    """The one top-level folder of an archive made with ``tar czf x.tar.gz x/`` (else "").

    Entered when most files sit at least two folders deep inside it (``x/<class>/<file>``); pass ``subdir="."``
    to take the archive's root as it is.
    """
    visible = [f for f in files if not _is_hidden(f)]
    tops = {f.split("/", 1)[0] for f in visible}
    if len(tops) == 1 and all("/" in f for f in visible):
        deep = sum(f.count("/") >= 2 for f in visible)
        if deep > len(visible) - deep:
            return next(iter(tops))
    return ""
