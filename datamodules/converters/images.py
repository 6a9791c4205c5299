"""One source image checked and made fit for a shard: RGB JPEG/PNG bytes kept, other modes and formats converted,
undecodable, too small and too large images refused with the counter they go to."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Below this side an image carries no usable content for contrastive views (1x1 trackers, icons).
DEFAULT_MIN_SIDE = 8
# Decompression-bomb guard, read from the header before decoding. The same limit as the training stream's decoder
# (datamodules.decode.DEFAULT_MAX_PIXELS), so a converted image is never one the stream would then skip.
DEFAULT_MAX_PIXELS = 64_000_000
# Quality for re-encoding JPEG sources whose colour mode had to change (grayscale/CMYK JPEGs): near-lossless.
REENCODE_JPEG_QUALITY = 95
# Sources with lossy compression are re-encoded as JPEG; everything else as lossless PNG.
_LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})


class SkipSample(Exception):
    """A source sample that cannot be written; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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
