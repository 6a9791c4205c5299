"""Converters from common dataset layouts to clbd shard sets (``{prefix}-NNNNNN.tar`` + ``{prefix}.index.json``).

Each converter reads its source in sorted order, checks every image, and writes samples through ``ShardSink``:
``key.jpg`` or ``key.png`` (image bytes), ``key.cls`` (class index, when labelled), ``key.txt`` (caption, when
there is one), ``key.json`` (provenance and all captions, where useful). It returns a small report dict::

    {"converter": ..., "out": ..., "seconds": ...,
     "splits": {"train": {"written": N, "shards": S, "index": PATH, "per_class": {name: n} | None,
                          "skipped": {reason: n}, "converted": {"color_converted": n, ...}}},
     "written": N_total, "skipped": {reason: n}, "converted": {...}}

Images that are already RGB JPEG/PNG keep their original bytes (no quality loss). Other colour modes and formats
are converted to RGB and re-encoded (counted). Undecodable, too small and too large (decompression-bomb) images
are skipped and counted, never a crash. Output is never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datamodules.faults import FaultCounter
from datamodules.shards import INDEX_SUFFIX, ShardIndex, ShardInfo, ShardSink, index_path_for, sample_key

DEFAULT_MAXCOUNT = 10000
# Below this side an image carries no usable content for contrastive views (1x1 trackers, icons).
DEFAULT_MIN_SIDE = 8
# Decompression-bomb guard, read from the header before decoding. The same limit as the training stream's decoder
# (datamodules.decode.DEFAULT_MAX_PIXELS), so a converted image is never one the stream would then skip.
DEFAULT_MAX_PIXELS = 64_000_000
# Archives that cannot be read in random order (.tar.gz, ...) are held in memory to be sorted; beyond this,
# unpacking them first is the better plan and the converter says so.
DEFAULT_MAX_ARCHIVE_BYTES = 8 * 1024**3
# Quality for re-encoding JPEG sources whose colour mode had to change (grayscale/CMYK JPEGs): near-lossless.
REENCODE_JPEG_QUALITY = 95

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm", "jfif"})
SPLIT_FOLDERS = ("train", "val", "test")
# Sources with lossy compression are re-encoded as JPEG; everything else as lossless PNG.
_LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
_KEY_UNSAFE = re.compile(r"[^\w-]")
_PREFIX_OK = re.compile(r"[\w-]+")


class SkipSample(Exception):
    """A source sample that cannot be written; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------------------
# Image checks


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    ext: str  # "jpg" or "png"
    converted: str | None = None  # counter name when the image was converted ("color_converted", ...)


def prepare_image(data: bytes, limits: ImageLimits = ImageLimits()) -> PreparedImage:
    """Check one encoded image and return bytes fit for a shard, or raise ``SkipSample``.

    RGB JPEG/PNG (8 bit) keep their bytes. Grayscale, RGBA, CMYK, palette and 16-bit images become RGB
    (alpha composited on white) and are re-encoded; other formats (BMP, GIF, WEBP, TIFF) are re-encoded too.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise SkipSample("image_too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise SkipSample("image_undecodable", "not an image format PIL recognises") from None
        except Exception as exc:  # PIL raises many types for broken headers (SyntaxError, ValueError, ...)
            raise SkipSample("image_undecodable", repr(exc)) from None
        width, height = image.size
        if width * height > limits.max_pixels:
            raise SkipSample("image_too_large", f"{width}x{height} > {limits.max_pixels} pixels")
        if min(width, height) < limits.min_side:
            raise SkipSample("image_too_small", f"{width}x{height} < {limits.min_side} px")
        try:
            image.load()  # a full decode: truncated and corrupt files fail here, not in training
        except Exception as exc:
            raise SkipSample("image_undecodable", repr(exc)) from None
    fmt = image.format or ""
    if fmt in ("JPEG", "MPO", "PNG") and image.mode == "RGB" and not _is_16bit_png(data, fmt):
        return PreparedImage(data, "png" if fmt == "PNG" else "jpg")
    converted = "color_converted" if image.mode != "RGB" or _is_16bit_png(data, fmt) else "format_converted"
    out = io.BytesIO()
    try:
        rgb = to_rgb(image)
        if fmt in _LOSSY_FORMATS:
            rgb.save(out, format="JPEG", quality=REENCODE_JPEG_QUALITY)
        else:
            rgb.save(out, format="PNG")
    except Exception as exc:  # an exotic mode PIL decodes but cannot convert
        raise SkipSample("image_undecodable", f"cannot convert {fmt} {image.mode} to RGB: {exc!r}") from None
    return PreparedImage(out.getvalue(), "jpg" if fmt in _LOSSY_FORMATS else "png", converted)


def _is_16bit_png(data: bytes, fmt: str) -> bool:
    # IHDR bit depth sits at byte 24 of every PNG (8 signature + 8 chunk header + 8 width/height).
    return fmt == "PNG" and len(data) > 24 and data[24] == 16


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image to 8-bit RGB: alpha composited on white, 16/32-bit values scaled (not clipped) to 0..255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_png(array: np.ndarray) -> bytes:
    """An HxWx3 uint8 array as PNG bytes (lossless; the same array gives the same bytes)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Reading a folder or an archive the same way


class FileTree:
    """The regular files of a folder or a tar archive, by POSIX path relative to its root, read in any order.

    Plain ``.tar`` files are read in place by seeking; compressed archives (``.tar.gz``...) are read once,
    sequentially, into memory (nothing is unpacked to disk), so that their files can be taken in sorted order.
    """

    def __init__(self, src: str | os.PathLike, *, max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES):
        self.src = Path(src)
        self._files: dict[str, Callable[[], bytes]] = {}
        self._dirs: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        if not self.src.exists():
            raise FileNotFoundError(f"source does not exist: {self.src}")
        if self.src.is_dir():
            self.kind = "folder"
            self._scan_folder()
        elif tarfile.is_tarfile(self.src):
            self.kind = "archive"
            self._scan_archive(max_archive_bytes)
        else:
            raise ValueError(f"source {self.src} is neither a folder nor a tar archive (.tar, .tar.gz, .tgz)")

    def _scan_folder(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.src, followlinks=True):  # class folders may be links
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .ipynb_checkpoints, ...
            rel_dir = Path(dirpath).relative_to(self.src).as_posix()
            if rel_dir != ".":
                self._dirs.add(rel_dir)
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                full = Path(dirpath) / name
                if full.is_file():
                    self._files[rel] = full.read_bytes

    def _scan_archive(self, max_bytes: int) -> None:
        try:
            if _is_uncompressed_tar(self.src):
                tar = self._tar = tarfile.open(self.src, mode="r:")
                for info in tar.getmembers():
                    self._add_member(info, _member_reader(tar, info) if info.isreg() else None)
                return
            held = 0
            with tarfile.open(self.src, mode="r|*") as stream:
                for info in stream:
                    if not info.isreg():
                        self._add_member(info, None)
                        continue
                    held += info.size
                    if held > max_bytes:
                        raise ValueError(
                            f"archive {self.src} holds more than {max_bytes / 1024**3:.1f} GiB of files; compressed "
                            "archives are read into memory to be sorted: unpack it and pass the folder instead"
                        )
                    reader = stream.extractfile(info)
                    data = reader.read() if reader is not None else b""
                    self._add_member(info, _constant(data))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"archive {self.src} cannot be read: {exc}") from None

    def _add_member(self, info: tarfile.TarInfo, reader: Callable[[], bytes] | None) -> None:
        name = _clean_member_name(info.name)
        if not name:
            return
        parts = name.split("/")
        self._dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.isdir():
            self._dirs.add(name)
        elif reader is not None:
            self._files[name] = reader

    def files(self) -> list[str]:
        return sorted(self._files)

    def dirs(self) -> list[str]:
        """Every folder, including empty ones and those only implied by a file's path."""
        return sorted(self._dirs)

    def read(self, rel: str) -> bytes:
        return self._files[rel]()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> FileTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_uncompressed_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except tarfile.TarError:
        return False


def _clean_member_name(name: str) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "/")]
    return "/".join(parts)


def _member_reader(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        handle = tar.extractfile(info)
        return handle.read() if handle is not None else b""

    return read


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _extension(rel: str) -> str:
    return rel.rpartition(".")[2].lower() if "." in rel.rpartition("/")[2] else ""


# ----------------------------------------------------------------------------------------------------------------
# Keys, output checks, the writing loop


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


def write_split(
    out: str | os.PathLike,
    prefix: str,
    samples: Sequence[SourceSample],
    *,
    classes: Sequence[str] | None,
    source: dict[str, Any],
    maxcount: int,
    overwrite: bool,
    limits: ImageLimits,
    progress: bool,
    faults: FaultCounter | None = None,
) -> SplitResult:
    """Check and write ``samples`` (already in their final order) as the shard set ``prefix`` in ``out``."""
    result = SplitResult(prefix, classes=list(classes) if classes is not None else None)
    if faults is not None:
        result.faults = faults
    if not samples:
        skipped = {k: v for k, v in result.faults.as_dict().items() if v}
        raise ValueError(
            f"{source.get('path') or source.get('images') or out}: no sample to write for {prefix!r}"
            + (f" (skipped: {skipped})" if skipped else " (the source is empty)")
        )
    sink = ShardSink(out, prefix, maxcount=maxcount, overwrite=overwrite, classes=classes, source=source)
    with sink:
        for sample in tqdm(
            samples,
            desc=f"{source.get('converter', 'convert')} {prefix}",
            unit="img",
            disable=not progress,
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


def _report(converter: str, out: str | os.PathLike, results: Sequence[SplitResult], started: float) -> dict[str, Any]:
    splits = {r.prefix: r.as_dict() for r in results}
    skipped: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    for split in splits.values():
        skipped.update(split["skipped"])
        converted.update(split["converted"])
    return {
        "converter": converter,
        "out": str(Path(out)),
        "splits": splits,
        "written": sum(s["written"] for s in splits.values()),
        "skipped": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _common_options(maxcount: int, limits: ImageLimits) -> dict[str, Any]:
    return {"maxcount": maxcount, "min_side": limits.min_side, "max_pixels": limits.max_pixels}


# ----------------------------------------------------------------------------------------------------------------
# Class-folder layouts (CIFAR-10 as JPEGs, ImageNet-style folders)


@dataclass
class _ClassFiles:
    """Files of one split grouped by class folder, plus what did not fit the layout."""

    by_class: dict[str, list[str]] = field(default_factory=dict)
    faults: FaultCounter = field(default_factory=FaultCounter)


def _group_by_class(tree: FileTree, root: str) -> _ClassFiles:
    """``root/<class>/.../name.ext`` -> by class (empty class folders included); hidden files, non-images and
    files outside a class folder are counted."""
    grouped = _ClassFiles()
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


def _class_samples(
    tree: FileTree, grouped: _ClassFiles, root: str, classes: Sequence[str], prefix: str, shuffle_seed: int | None
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


def _class_order(names: Iterable[str], classes: Sequence[str] | None, where: str) -> list[str]:
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
    limits = ImageLimits(min_side, max_pixels)
    check_output_free(out, [prefix], overwrite)
    with FileTree(src) as tree:
        files = tree.files()
        if subdir is not None:
            root = _clean_member_name(subdir)
        else:
            root = _unwrap_single_folder(files) if tree.kind == "archive" else ""
        if root and root not in tree.dirs():
            raise FileNotFoundError(f"{src}: has no folder {root!r}")
        grouped = _group_by_class(tree, root)
        order = _class_order(grouped.by_class, classes, f"{src}")
        samples = _class_samples(tree, grouped, root, order, prefix, shuffle_seed)
        source = {
            "converter": "image_folder",
            "path": str(Path(src).resolve()),
            "options": {
                "prefix": prefix,
                "subdir": subdir,
                "classes": classes and list(classes),
                "shuffle_seed": shuffle_seed,
                **_common_options(maxcount, limits),
            },
        }
        result = write_split(
            out,
            prefix,
            samples,
            classes=order,
            source=source,
            maxcount=maxcount,
            overwrite=overwrite,
            limits=limits,
            progress=progress,
            faults=grouped.faults,
        )
    return _report("image_folder", out, [result], started)


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


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10


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
    limits = ImageLimits(min_side, max_pixels)
    check_output_free(out, ["train", "test"], overwrite)
    with FileTree(src) as tree:
        files = tree.files()
        batches = [f for f in files if f.rpartition("/")[2] == "data_batch_1"]
        if batches:
            results = _cifar10_python(
                tree,
                files,
                batches[0].rpartition("/")[0],
                src,
                out,
                overwrite=overwrite,
                maxcount=maxcount,
                limits=limits,
                progress=progress,
            )
        else:
            results = _cifar10_folders(
                tree,
                files,
                src,
                out,
                overwrite=overwrite,
                maxcount=maxcount,
                limits=limits,
                progress=progress,
                shuffle_seed=shuffle_seed,
            )
    return _report("cifar10", out, results, started)


def _cifar10_folders(
    tree: FileTree, files: list[str], src, out, *, overwrite, maxcount, limits, progress, shuffle_seed
):
    root = _find_split_root(files)
    if root is None:
        raise ValueError(
            f"{src}: no CIFAR-10 layout found: expected torchvision's cifar-10-batches-py (data_batch_1...) or "
            f"folders train/<class>/*.jpg and test/<class>/*.jpg"
        )
    base = f"{root}/" if root else ""
    splits = [s for s in SPLIT_FOLDERS if any(f.startswith(f"{base}{s}/") for f in files)]
    check_output_free(out, splits, overwrite)
    grouped = {s: _group_by_class(tree, f"{base}{s}") for s in splits}
    order = _class_order([c for g in grouped.values() for c in g.by_class], None, str(src))
    results = []
    for split in splits:
        samples = _class_samples(tree, grouped[split], f"{base}{split}", order, split, shuffle_seed)
        source = {
            "converter": "cifar10",
            "layout": f"image folders ({tree.kind})",
            "path": str(Path(src).resolve()),
            "split": split,
            "options": {"shuffle_seed": shuffle_seed, **_common_options(maxcount, limits)},
        }
        results.append(
            write_split(
                out,
                split,
                samples,
                classes=order,
                source=source,
                maxcount=maxcount,
                overwrite=overwrite,
                limits=limits,
                progress=progress,
                faults=grouped[split].faults,
            )
        )
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
    tree: FileTree, files: list[str], folder: str, src, out, *, overwrite, maxcount, limits, progress
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
            "options": _common_options(maxcount, limits),
        }
        results.append(
            write_split(
                out,
                split,
                samples,
                classes=classes,
                source=source,
                maxcount=maxcount,
                overwrite=overwrite,
                limits=limits,
                progress=progress,
            )
        )
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


# ----------------------------------------------------------------------------------------------------------------
# Captions: COCO-style JSON and CSV


def convert_coco_captions(
    images: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "train",
    captions: str = "first",
    overwrite: bool = False,
    maxcount: int = DEFAULT_MAXCOUNT,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """COCO-style captions (``images[]`` with id/file_name, ``annotations[]`` with image_id/caption) -> shards.

    ``captions="first"``: one sample per image with its first caption (file order) in ``key.txt``;
    ``captions="all"``: one sample per caption, keys ``{key}_{n}``. ``key.json`` holds the image id, file name and
    all captions either way. Images are taken sorted by file name; images without a caption are counted.
    """
    started = time.perf_counter()
    check_prefix(prefix)
    if captions not in ("first", "all"):
        raise ValueError(f"captions must be 'first' or 'all', got {captions!r}")
    limits = ImageLimits(min_side, max_pixels)
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"images folder does not exist: {images}")
    entries, captions_of, faults = _read_coco(Path(annotations))
    check_output_free(out, [prefix], overwrite)
    keys = KeyMaker(prefix)
    samples: list[SourceSample] = []
    for entry in sorted(entries, key=lambda e: (str(e["file_name"]), str(e["id"]))):
        file_name = str(entry["file_name"])
        texts = captions_of.get(entry["id"], [])
        path = images / file_name
        if not texts:
            faults.add("caption_missing", f"{file_name}: no caption")
            continue
        if not path.is_file():
            faults.add("file_missing", f"{path}: listed in {annotations} but not found")
            continue
        stem = file_name.rpartition(".")[0] if "." in file_name else file_name
        meta = {"image_id": entry["id"], "file_name": file_name, "captions": texts}
        if captions == "first":
            samples.append(SourceSample(keys(stem), path.read_bytes, caption=texts[0], meta=meta, name=str(path)))
        else:
            for n, text in enumerate(texts):
                samples.append(
                    SourceSample(
                        keys(f"{stem}_{n}"),
                        path.read_bytes,
                        caption=text,
                        meta={**meta, "caption_index": n},
                        name=str(path),
                    )
                )
    if keys.renamed:
        faults.add("key_renamed", n=keys.renamed)
    source = {
        "converter": "coco_captions",
        "images": str(images.resolve()),
        "annotations": str(Path(annotations).resolve()),
        "options": {"prefix": prefix, "captions": captions, **_common_options(maxcount, limits)},
    }
    result = write_split(
        out,
        prefix,
        samples,
        classes=None,
        source=source,
        maxcount=maxcount,
        overwrite=overwrite,
        limits=limits,
        progress=progress,
        faults=faults,
    )
    return _report("coco_captions", out, [result], started)


def _read_coco(path: Path) -> tuple[list[dict[str, Any]], dict[Any, list[str]], FaultCounter]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"annotations file does not exist: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotations file {path} is not valid JSON: {exc}") from None
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("images"), list)
        or not isinstance(raw.get("annotations"), list)
    ):
        raise ValueError(f"annotations file {path} must hold lists 'images' and 'annotations' (COCO captions format)")
    faults = FaultCounter()
    entries, ids = [], set()
    for i, entry in enumerate(raw["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not entry.get("file_name"):
            raise ValueError(f"annotations file {path}: images[{i}] lacks 'id' or 'file_name'")
        if entry["id"] in ids:
            raise ValueError(f"annotations file {path}: image id {entry['id']!r} appears twice in images[]")
        ids.add(entry["id"])
        entries.append(entry)
    captions_of: dict[Any, list[str]] = {}
    for i, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"annotations file {path}: annotations[{i}] lacks 'image_id'")
        if ann["image_id"] not in ids:
            faults.add("annotation_orphan", f"annotations[{i}] names image id {ann['image_id']!r}, not in images[]")
            continue
        text = ann.get("caption")
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            faults.add("caption_empty", f"annotations[{i}] has no caption text")
            continue
        captions_of.setdefault(ann["image_id"], []).append(text)
    return entries, captions_of, faults


def convert_csv(
    csv_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "train",
    root: str | os.PathLike | None = None,
    delimiter: str | None = None,
    overwrite: bool = False,
    maxcount: int = DEFAULT_MAXCOUNT,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """A CSV with header ``filepath,caption`` -> shards, one sample per row in file order (keys ``{prefix}_{row}``).

    Relative paths are resolved against ``root`` (default: the CSV's folder). Rows whose file is missing or whose
    caption is empty are skipped and counted (``file_missing``, ``caption_missing``). Other columns go to
    ``key.json`` with the path. ``delimiter`` defaults to tab for ``.tsv`` files, else comma.
    """
    started = time.perf_counter()
    check_prefix(prefix)
    limits = ImageLimits(min_side, max_pixels)
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file does not exist: {csv_path}")
    base = Path(root) if root is not None else csv_path.parent
    if not base.is_dir():
        raise FileNotFoundError(f"root folder does not exist: {base}")
    delimiter = delimiter or ("\t" if csv_path.suffix.lower() == ".tsv" else ",")
    rows = _read_csv(csv_path, delimiter)
    check_output_free(out, [prefix], overwrite)
    faults = FaultCounter()
    samples = []
    width = max(6, len(str(len(rows))))
    for number, row in enumerate(rows):
        rel = (row.get("filepath") or "").strip()
        caption = (row.get("caption") or "").strip()
        where = f"{csv_path} row {number + 2}"  # 1-based, after the header
        if not rel:
            faults.add("file_missing", f"{where}: empty filepath")
            continue
        path = Path(rel) if os.path.isabs(rel) else base / rel
        if not path.is_file():
            faults.add("file_missing", f"{where}: {path} not found")
            continue
        if not caption:
            faults.add("caption_missing", f"{where}: empty caption for {rel}")
            continue
        meta = {k: v for k, v in row.items() if k is not None and k != "caption"}
        samples.append(
            SourceSample(
                f"{sanitize_key(prefix)}_{number:0{width}d}",
                path.read_bytes,
                caption=caption,
                meta=meta,
                name=str(path),
            )
        )
    source = {
        "converter": "csv",
        "path": str(csv_path.resolve()),
        "root": str(base.resolve()),
        "options": {"prefix": prefix, "delimiter": delimiter, **_common_options(maxcount, limits)},
    }
    result = write_split(
        out,
        prefix,
        samples,
        classes=None,
        source=source,
        maxcount=maxcount,
        overwrite=overwrite,
        limits=limits,
        progress=progress,
        faults=faults,
    )
    return _report("csv", out, [result], started)


def _read_csv(path: Path, delimiter: str) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("filepath", "caption") if c not in header]
            if missing:
                raise ValueError(
                    f"CSV file {path} lacks column(s) {', '.join(missing)} in its header (found: {header or 'none'}); "
                    "expected a header 'filepath,caption'"
                )
            reader.fieldnames = header
            return list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"CSV file {path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ValueError(f"CSV file {path} cannot be parsed: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# img2dataset output: validate and index in place

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


# ----------------------------------------------------------------------------------------------------------------


def iter_index_files(path: str | os.PathLike) -> Iterator[Path]:
    """Index files at ``path``: the file itself, or every ``*.index.json`` in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        yield from sorted(path.glob(f"*{INDEX_SUFFIX}"))
    elif path.exists():
        yield path
