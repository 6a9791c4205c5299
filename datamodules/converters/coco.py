"""COCO-style caption annotations (``images[]`` + ``annotations[]``) and an image folder -> image-text shards."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from datamodules.faults import FaultCounter

from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits
from .writer import DEFAULT_MAXCOUNT, KeyMaker, SourceSample, SplitWriter, check_prefix


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
    writer = SplitWriter(out, maxcount, overwrite, ImageLimits(min_side, max_pixels), progress)
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"images folder does not exist: {images}")
    entries, captions_of, faults = _read_coco(Path(annotations))
    writer.check_free([prefix])
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
        "options": {"prefix": prefix, "captions": captions, **writer.options()},
    }
    result = writer.write(prefix, samples, classes=None, source=source, faults=faults)
    return writer.report("coco_captions", [result], started)


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
