"""Trigger patterns and how they are put on images.

A ``Trigger`` only knows how to draw itself as a square RGB patch of a given side; where and how strongly it goes
on an image is the attack's business (``paste_trigger`` does the blending). Triggers are built from simple
arguments so that jsonargparse / LightningCLI can construct them from YAML::

    trigger: {class_path: poisoning.GeneratedTrigger, init_args: {kind: patch, seed: 3}}
    trigger: {class_path: poisoning.ImageTrigger, init_args: {path: my_trigger.png}}
"""

from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

GENERATED_KINDS = ("patch", "checkerboard", "noise")

# Blocks per side of the "patch" kind: coarse enough to survive down-scaling in random crops.
_PATCH_BLOCKS = 4


def default_trigger_size(image_size: int) -> int:
    """The authors' trigger sides: 8 px on 32 px images, 50 px on 224 px images.

    Small images (<= 64 px) use a quarter of the side; larger ones scale the ImageNet setting (50/224).
    """
    if image_size <= 64:
        return max(1, round(image_size * 0.25))
    return max(1, round(image_size * 50 / 224))


class Trigger:
    """Base class: a deterministic square RGB pattern."""

    def patch(self, size: int) -> Image.Image:
        """The trigger as an RGB image of ``size`` x ``size`` pixels; the same pixels on every call."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"class": type(self).__name__}


class GeneratedTrigger(Trigger):
    """A seeded synthetic trigger.

    kind:
      - ``patch``: a 4x4 grid of random saturated colours (a "colourful blocks" trigger like the HTBA ones);
      - ``checkerboard``: two seeded contrasting colours in a 4x4 checkerboard;
      - ``noise``: i.i.d. uniform RGB noise per pixel (at the requested size).
    """

    def __init__(self, kind: str = "patch", seed: int = 0):
        if kind not in GENERATED_KINDS:
            raise ValueError(f"trigger kind={kind!r} is unknown; choose one of {', '.join(GENERATED_KINDS)}")
        self.kind = kind
        self.seed = int(seed)

    def patch(self, size: int) -> Image.Image:
        return _generated_patch(self.kind, self.seed, int(size)).copy()

    def describe(self) -> dict:
        return {"class": "GeneratedTrigger", "kind": self.kind, "seed": self.seed}

    def __repr__(self) -> str:
        return f"GeneratedTrigger(kind={self.kind!r}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneratedTrigger) and (self.kind, self.seed) == (other.kind, other.seed)

    def __hash__(self) -> int:
        return hash((self.kind, self.seed))


@lru_cache(maxsize=64)
def _generated_patch(kind: str, seed: int, size: int) -> Image.Image:
    if size < 1:
        raise ValueError(f"trigger size must be >= 1, got {size}")
    rng = np.random.default_rng([seed, GENERATED_KINDS.index(kind)])
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")
    if kind == "patch":
        # Saturated colours: each channel near 0 or near 255, so blocks differ strongly from natural images.
        levels = rng.choice(np.array([0, 32, 224, 255], dtype=np.uint8), size=(_PATCH_BLOCKS, _PATCH_BLOCKS, 3))
        grid = levels
    else:  # checkerboard
        first = rng.integers(0, 128, size=3, dtype=np.uint8)
        second = (255 - first).astype(np.uint8)
        parity = np.add.outer(np.arange(_PATCH_BLOCKS), np.arange(_PATCH_BLOCKS)) % 2
        grid = np.where(parity[..., None] == 0, first, second).astype(np.uint8)
    small = Image.fromarray(grid, "RGB")
    return small.resize((size, size), Image.Resampling.NEAREST)


class ImageTrigger(Trigger):
    """A user's trigger image, resized to the trigger side (bilinear).

    The file is read and decoded at construction, so a wrong path fails before training starts; the encoded
    bytes are kept, so the trigger travels with the (pickled) poison plan to workers on any machine.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"trigger image not found: {self.path}")
        if not os.path.isfile(self.path):
            raise ValueError(f"trigger image path is not a file: {self.path}")
        with open(self.path, "rb") as handle:
            self._data = handle.read()
        try:
            with Image.open(io.BytesIO(self._data)) as img:
                img.load()
                self._size = img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"trigger image {self.path} is not an image PIL can read: {exc}") from None
        self._decoded: Image.Image | None = None
        self._resized: dict[int, Image.Image] = {}

    def _image(self) -> Image.Image:
        if self._decoded is None:
            with Image.open(io.BytesIO(self._data)) as img:
                self._decoded = _to_rgb(img)
        return self._decoded

    def patch(self, size: int) -> Image.Image:
        size = int(size)
        if size < 1:
            raise ValueError(f"trigger size must be >= 1, got {size}")
        if size not in self._resized:
            self._resized[size] = self._image().resize((size, size), Image.Resampling.BILINEAR)
        return self._resized[size].copy()

    def describe(self) -> dict:
        return {"class": "ImageTrigger", "path": self.path, "size": list(self._size)}

    def __repr__(self) -> str:
        return f"ImageTrigger(path={self.path!r})"

    def __getstate__(self) -> dict:
        # Decoded copies are per-process caches; only the file's bytes travel.
        return {"path": self.path, "_data": self._data, "_size": self._size}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._decoded = None
        self._resized = {}


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels of RGBA / palette images are put on black (a trigger has no alpha)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


Box = tuple[int, int, int, int]


def paste_trigger(image: Image.Image, patch: Image.Image, box: Box, alpha: float = 0.8) -> Image.Image:
    """A copy of ``image`` whose pixels inside ``box`` are ``alpha * patch + (1 - alpha) * image``.

    ``box`` is (x0, y0, x1, y1) with x1, y1 exclusive and must lie inside the image; the patch is resized to the
    box if needed. alpha = 1 pastes the trigger opaquely; pixels outside the box are never touched.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"trigger_alpha must be in [0, 1], got {alpha}")
    x0, y0, x1, y1 = (int(v) for v in box)
    width, height = image.size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"trigger box {box} does not fit in an image of size {width}x{height}")
    if patch.size != (x1 - x0, y1 - y0):
        patch = patch.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    if patch.mode != "RGB":
        patch = patch.convert("RGB")
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    if alpha >= 1.0:
        out.paste(patch, (x0, y0))
    elif alpha > 0.0:
        region = out.crop((x0, y0, x1, y1))
        out.paste(Image.blend(region, patch, alpha), (x0, y0))
    return out
