"""Raw tar samples to RGB images, labels and captions; anything unusable is skipped and counted."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .faults import FaultCounter

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "caption")

# PIL warns at 89M pixels and raises at twice that; a training stream should skip such samples early.
DEFAULT_MAX_PIXELS = 64_000_000


def _to_rgb(image: Image.Image, faults: FaultCounter) -> Image.Image:
    if image.mode == "RGB":
        return image
    faults.add("color_converted")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than let PIL clip everything above 255 to white.
        lo, hi = image.getextrema()
        scale = 255.0 / max(hi - lo, 1)
        image = image.point(lambda v: (v - lo) * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent areas become white, not black (what viewers show).
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(
    data: bytes, faults: FaultCounter, key: str, *, min_size: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                faults.add("image_too_large", f"{key}: {width}x{height} image is over {max_pixels} pixels")
                return None
            if min(width, height) < min_size:
                faults.add("image_too_small", f"{key}: {width}x{height} image is under {min_size} px")
                return None
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        faults.add("image_too_large", f"{key}: {exc}")
        return None
    except Exception as exc:  # PIL raises many types for bad bytes; every one means "skip this sample"
        faults.add("image_undecodable", f"{key}: {type(exc).__name__}: {exc}")
        return None
    return _to_rgb(image, faults)


def image_member(raw: dict[str, Any]) -> str | None:
    """The extension of the member a sample's image is decoded from (the first of ``IMAGE_EXTENSIONS`` present)."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)


class _Recorder(FaultCounter):
    """A fault counter that keeps what was added, to be added again on every later use of the sample."""

    def __init__(self) -> None:
        super().__init__(warner=lambda kind, message: None)
        self.added: list[tuple[str, str, int]] = []

    def add(self, kind: str, message: str = "", n: int = 1) -> None:
        self.added.append((kind, message, n))


@dataclass(frozen=True)
class DecodedImage:
    """An image member decoded once: its RGB pixels (None: undecodable or refused) and the faults that counted."""

    pixels: np.ndarray | None
    faults: tuple[tuple[str, str, int], ...]

    def image(self, faults: FaultCounter) -> Image.Image | None:
        """A fresh PIL image (poisoners may draw on it; the resident pixels stay as read), faults added again."""
        for kind, message, n in self.faults:
            faults.add(kind, message, n)
        return None if self.pixels is None else Image.fromarray(self.pixels)


def decode_member(data: bytes, key: str, *, min_size: int) -> DecodedImage:
    recorder = _Recorder()
    image = decode_image(data, recorder, key, min_size=min_size)
    pixels = None if image is None else np.asarray(image, dtype=np.uint8)
    return DecodedImage(pixels, tuple(recorder.added))


def _caption(raw: dict[str, Any]) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        if ext in raw:
            try:
                text = raw[ext].decode("utf-8").strip()
            except UnicodeDecodeError:
                return None
            return text or None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            return None
        text = meta.get("caption") if isinstance(meta, dict) else None
        return text.strip() if isinstance(text, str) and text.strip() else None
    return None


def _label(raw: dict[str, Any]) -> int | None:
    value = raw.get("cls")
    if value is None:
        return None
    try:
        return int(value.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return None


def decode_sample(
    raw: dict[str, Any],
    faults: FaultCounter,
    *,
    need_label: bool,
    need_text: bool,
    min_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any] | None:
    """``{"__key__", "jpg": bytes, "cls": bytes, "txt": bytes}`` -> ``{"__key__", "image", "label", "text"}``."""
    key = raw["__key__"]
    label = _label(raw)
    if need_label and label is None:
        faults.add("label_missing", f"{key}: no usable .cls")
        return None
    text = _caption(raw)
    if need_text and text is None:
        faults.add("caption_missing", f"{key}: no usable caption (.txt or .json 'caption')")
        return None
    member = image_member(raw)
    if member is None:
        faults.add("image_missing", f"{key}: no image member (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return None
    data = raw[member]
    if isinstance(data, DecodedImage):  # decoded ahead (data.resident) with the same limits
        image = data.image(faults)
    else:
        image = decode_image(data, faults, key, min_size=min_size, max_pixels=max_pixels)
    if image is None:
        return None
    return {"__key__": key, "image": image, "label": -1 if label is None else label, "text": text}
