"""CIFAR-10 from torchvision's python batches (arrays -> lossless PNG) or from ``train|test/<class>/`` folders."""

from __future__ import annotations

import io
import os
import pickle
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .file_tree import FileTree
from .image_folder import class_order, class_samples, group_by_class
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits, encode_png
from .writer import DEFAULT_MAXCOUNT, SourceSample, SplitResult, SplitWriter

SPLIT_FOLDERS = ("train", "val", "test")


def convert_cifar10(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    maxcount: int = DEFAULT_MAXCOUNT,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """CIFAR-10 -> ``out/train-*.tar`` and ``out/test-*.tar`` (+ indexes), labels in CIFAR-10's official order.

    ``src`` is torchvision's python format (the ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz``;
    images encoded as lossless PNG, keys ``train_000000``...) or an image-folder layout ``train/<class>/*.jpg``,
    ``test/<class>/*.jpg`` as a folder or a tar archive read in place (original JPEG bytes kept; keys
    ``train_<class>_<name>``, shuffled with ``shuffle_seed`` like ``convert_image_folder``).
    """
    started = time.perf_counter()
    writer = SplitWriter(out, maxcount, overwrite, ImageLimits(min_side, max_pixels), progress)
    writer.check_free(["train", "test"])
    with FileTree(src) as tree:
        files = tree.files()
        batches = [f for f in files if f.rpartition("/")[2] == "data_batch_1"]
        if batches:
            results = _cifar10_python(tree, files, batches[0].rpartition("/")[0], src, writer)
        else:
            results = _cifar10_folders(tree, files, src, writer, shuffle_seed)
    return writer.report("cifar10", results, started)


def _cifar10_folders(
    tree: FileTree, files: list[str], src: str | os.PathLike, writer: SplitWriter, shuffle_seed: int | None
) -> list[SplitResult]:
    root = _find_split_root(files)
    if root is None:
        raise ValueError(
            f"{src}: no CIFAR-10 layout found: expected torchvision's cifar-10-batches-py (data_batch_1...) or "
            f"folders train/<class>/*.jpg and test/<class>/*.jpg"
        )
    base = f"{root}/" if root else ""
    splits = [s for s in SPLIT_FOLDERS if any(f.startswith(f"{base}{s}/") for f in files)]
    writer.check_free(splits)
    grouped = {s: group_by_class(tree, f"{base}{s}") for s in splits}
    order = class_order([c for g in grouped.values() for c in g.by_class], None, str(src))
    results = []
    for split in splits:
        samples = class_samples(tree, grouped[split], f"{base}{split}", order, split, shuffle_seed)
        source = {
            "converter": "cifar10",
            "layout": f"image folders ({tree.kind})",
            "path": str(Path(src).resolve()),
            "split": split,
            "options": {"shuffle_seed": shuffle_seed, **writer.options()},
        }
        results.append(writer.write(split, samples, classes=order, source=source, faults=grouped[split].faults))
    return results


def _find_split_root(files: Iterable[str]) -> str | None:
    """The shallowest folder holding ``train/<class>/<file>`` or ``test/<class>/<file>``."""
    best: tuple[int, str] | None = None
    for rel in files:
        parts = rel.split("/")
        for i, part in enumerate(parts[:-2]):
            if part in SPLIT_FOLDERS and (best is None or i < best[0]):
                best = (i, "/".join(parts[:i]))
                break
    return None if best is None else best[1]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of lists and numpy arrays) and refuses anything else that could run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        if module == "numpy.core.multiarray":  # Python 2 era pickles; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_cifar_batch(data: bytes, name: str) -> dict[bytes, Any]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"{name}: not a CIFAR python batch: {exc}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: not a CIFAR python batch (a {type(batch).__name__}, expected a dict)")
    return batch


def _cifar10_python(
    tree: FileTree, files: list[str], folder: str, src: str | os.PathLike, writer: SplitWriter
) -> list[SplitResult]:
    base = f"{folder}/" if folder else ""
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = [n for n in needed if f"{base}{n}" not in files]
    if missing:
        raise FileNotFoundError(f"{src}: CIFAR-10 python folder {folder or '.'} lacks {', '.join(missing)}")
    meta = load_cifar_batch(tree.read(f"{base}batches.meta"), f"{base}batches.meta")
    names = meta.get(b"label_names")
    if not names:
        raise ValueError(f"{src}: {base}batches.meta has no b'label_names'")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    results = []
    for split, batch_names in (("train", needed[:5]), ("test", ["test_batch"])):
        images, labels = _cifar_arrays(tree, [f"{base}{n}" for n in batch_names], len(classes))
        samples = [
            SourceSample(
                f"{split}_{i:06d}", _png_of(images, i), label=int(labels[i]), name=f"{split}[{i}]", encoded=False
            )
            for i in range(len(labels))
        ]
        source = {
            "converter": "cifar10",
            "layout": f"torchvision python batches ({tree.kind})",
            "path": str(Path(src).resolve()),
            "split": split,
            "batches": batch_names,
            "options": writer.options(),
        }
        results.append(writer.write(split, samples, classes=classes, source=source))
    return results


def _cifar_arrays(tree: FileTree, names: list[str], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        batch = load_cifar_batch(tree.read(name), name)
        if b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{name}: CIFAR batch lacks b'data' or b'labels' (keys: {sorted(batch)})")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        label = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(label):
            raise ValueError(f"{name}: b'data' has shape {data.shape}, expected ({len(label)}, 3072)")
        if len(label) and (label.min() < 0 or label.max() >= n_classes):
            raise ValueError(f"{name}: labels outside 0..{n_classes - 1}")
        # rows hold the red plane, then green, then blue, each 32x32 row-major
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(label)
    return np.concatenate(images), np.concatenate(labels)


def _png_of(images: np.ndarray, i: int) -> Callable[[], bytes]:
    return lambda: encode_png(images[i])
