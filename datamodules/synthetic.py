"""The embedded default dataset: procedural shapes, generated in seconds, deterministic from a seed.

Ten shape classes are drawn with random colour, position, scale, a slight tilt and background (solid, gradient, noise,
stripes). Colour and background are drawn independently of the class, so only shape tells classes apart: an
encoder must learn shape (SimCLR's colour jitter and grayscale views make that the way to win). Each sample has a
true caption built from the attributes actually drawn ("a photo of a small red triangle on a striped background"),
so the same shards serve SimCLR (``png`` + ``cls``) and CLIP (``png`` + ``txt``).

Shapes are drawn as a mask at 4x the image size and downsampled (antialiased edges), then composited over the
background. Every image depends only on ``(seed, split, index)``; the PNG bytes are the same on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from datamodules.converters.images import encode_png
from datamodules.converters.writer import check_output_free
from datamodules.shards import ShardIndex, ShardSink, index_path_for

# Bump when the drawing changes: cached datasets made by another version are then regenerated.
GENERATOR_VERSION = 3  # 2: 500 samples per shard; 3: rotation within +-MAX_ROTATION_DEG
SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent", "heart", "arrow")
SPLITS = ("train", "val", "test")
# 500 / 100 / 100 per class: one CPU core generates this in about 4 s (0.35 ms to draw and encode an image, about
# as much again to write the tar), and it is enough for SimCLR to separate the classes above chance within minutes.
DEFAULT_SIZES = {"train": 5000, "val": 1000, "test": 1000}
DEFAULT_IMAGE_SIZE = 32
SUPERSAMPLE = 4

# Named colours (the caption uses the name of the colour drawn); each draw jitters the channels by up to +-18.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 40),
    "green": (45, 165, 60),
    "blue": (40, 85, 215),
    "purple": (135, 60, 185),
    "pink": (240, 125, 185),
    "cyan": (45, 200, 215),
    "brown": (125, 75, 35),
    "white": (245, 245, 240),
    "gray": (125, 125, 125),
    "black": (20, 20, 25),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = ("solid", "gradient", "noise", "stripes")
# Textured backgrounds are distractors; mostly plain ones keep the classes learnable in CPU minutes.
BACKGROUND_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
# Foreground and background colours must differ by at least this RGB distance, or the shape would vanish.
MIN_CONTRAST = 110.0
# Shapes are tilted by at most this much. SimCLR's views (crop, flip, colour) teach no rotation invariance, so with
# any rotation a kNN sees same-class shapes at unrelated angles as different. Measured (32 px, width 8, batch 128,
# 5 epochs): kNN accuracy 22.5% with rotations over 360 degrees (a random encoder: 21%), 30.1% with +-20 degrees.
MAX_ROTATION_DEG = 20.0
MIN_LUMA_CONTRAST = 40.0
CAPTION_TEMPLATES = (
    "a photo of a {size}{color} {shape}.",
    "a {size}{color} {shape} on a {background} background.",
    "a drawing of a {size}{color} {shape}.",
    "an image of a {shape} in {color}.",
    "a {color} {shape}.",
    "a picture of a {size}{shape}, colored {color}.",
)


# ----------------------------------------------------------------------------------------------------------------
# Shape outlines: lists of polygons in unit coordinates (centred at 0, radius about 1); the first polygon is
# filled, later ones are cut out (holes).


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    outer = _regular(points)
    inner_pts = _regular(points, inner, -math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(72):
        t = 2 * math.pi * k / 72
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x, -y))
    return pts


def _crescent() -> list[tuple[float, float]]:
    # outer arc of the unit circle and inner arc of a shifted circle, both between their two crossing points
    cx, r = 0.6, 0.8
    x_cross = (1 + cx * cx - r * r) / (2 * cx)
    y_cross = math.sqrt(max(0.0, 1 - x_cross * x_cross))
    a0 = math.atan2(y_cross, x_cross)
    outer = [(math.cos(a), math.sin(a)) for a in np.linspace(a0, 2 * math.pi - a0, 48)]
    b0 = math.atan2(y_cross, x_cross - cx)
    inner = [(cx + r * math.cos(b), r * math.sin(b)) for b in np.linspace(2 * math.pi - b0, b0, 48)]
    return outer + inner


def _normalised(polygons: list[list[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
    """Centre the outline's bounding box on 0 and scale its farthest point to radius 1: every shape then fits a
    circle of the drawn radius and can be placed without being cut by the image border."""
    xs = [x for poly in polygons for x, _ in poly]
    ys = [y for poly in polygons for _, y in poly]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    reach = max(math.hypot(x - cx, y - cy) for poly in polygons for x, y in poly)
    return [[((x - cx) / reach, (y - cy) / reach) for x, y in poly] for poly in polygons]


_OUTLINES: dict[str, list[list[tuple[float, float]]]] = {
    "circle": [_regular(64)],
    "square": [_regular(4, 1.0, math.pi / 4)],
    "triangle": [_regular(3)],
    "diamond": [[(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]],
    "star": [_star()],
    "cross": [
        [
            (-0.3, -1),
            (0.3, -1),
            (0.3, -0.3),
            (1, -0.3),
            (1, 0.3),
            (0.3, 0.3),
            (0.3, 1),
            (-0.3, 1),
            (-0.3, 0.3),
            (-1, 0.3),
            (-1, -0.3),
            (-0.3, -0.3),
        ]
    ],
    "ring": [_regular(64), _regular(64, 0.55)],
    "crescent": [_crescent()],
    "heart": [_heart()],
    "arrow": [[(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]],
}
SHAPES = {name: _normalised(polygons) for name, polygons in _OUTLINES.items()}
assert tuple(SHAPES) == SHAPE_CLASSES


# ----------------------------------------------------------------------------------------------------------------
# Drawing


_PALETTE = np.array([COLORS[n] for n in COLOR_NAMES], dtype=np.float64)
_LUMA = np.array([0.299, 0.587, 0.114])


def _contrasting(avoid: Sequence[np.ndarray], shape: np.ndarray | None, side: float) -> np.ndarray:
    allowed = np.ones(len(COLOR_NAMES), dtype=bool)
    for colour in [*avoid, *([] if shape is None else [shape])]:
        allowed &= np.sqrt(((_PALETTE - colour) ** 2).sum(axis=1)) >= MIN_CONTRAST
    if shape is not None:
        luma_gap = (_PALETTE - shape) @ _LUMA
        allowed &= np.abs(luma_gap) >= MIN_LUMA_CONTRAST
        if side:
            allowed &= luma_gap * side > 0
    return allowed


def _pick_color(
    rng: np.random.Generator, avoid: Sequence[np.ndarray] = (), shape: np.ndarray | None = None, side: float = 0.0
) -> tuple[str, np.ndarray]:
    """A named colour (with jitter) at least MIN_CONTRAST (RGB distance) away from every colour in ``avoid``.

    When ``shape`` (the shape's colour) is given, also MIN_LUMA_CONTRAST away from it in luminance (the shape stays
    visible in grayscale views), and with ``side`` (+1/-1) brighter/darker than it: the two colours of a patterned
    background then never blend into the shape's luminance.
    """
    allowed = _contrasting(avoid, shape, side)
    if not allowed.any():  # e.g. a shape darker than every colour but black, on black: pattern of one colour
        allowed = _contrasting((), shape, side)
    choices = np.flatnonzero(allowed) if allowed.any() else np.arange(len(COLOR_NAMES))
    pick = int(choices[rng.integers(len(choices))])
    jitter = rng.integers(-18, 19, size=3)
    return COLOR_NAMES[pick], np.clip(_PALETTE[pick] + jitter, 0, 255)


def _background(rng: np.random.Generator, size: int, kind: str, fg: np.ndarray) -> tuple[np.ndarray, str]:
    """An HxWx3 float image and its caption word; its colours keep MIN_CONTRAST from the foreground ``fg``."""
    name_a, a = _pick_color(rng, shape=fg)
    if kind == "solid":
        return np.broadcast_to(a, (size, size, 3)).copy(), name_a
    _, b = _pick_color(rng, [a], shape=fg, side=float(np.sign((a - fg) @ _LUMA)))
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        word = "gradient"
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.18, 0.4)  # in image widths: 6-13 px at 32 px, never aliased
        phase = rng.uniform(0, 2 * math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        t = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * math.pi * u / period + phase))
        word = "striped"
    else:  # smooth noise: a coarse random grid upsampled bicubically
        cells = int(rng.integers(3, 7))
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
        word = "noisy"
    t = t[..., None]
    return (1 - t) * a + t * b, word


def _shape_mask(label: int, size: int, center: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """The shape's coverage in [0, 1], drawn at SUPERSAMPLE x and box-filtered down (antialiased)."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cos, sin = math.cos(angle), math.sin(angle)
    for n, polygon in enumerate(SHAPES[SHAPE_CLASSES[label]]):
        points = [
            ((center[0] + radius * (x * cos - y * sin)) * big, (center[1] + radius * (x * sin + y * cos)) * big)
            for x, y in polygon
        ]
        draw.polygon(points, fill=0 if n else 255)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)[..., None] / 255.0


def render_shape(
    rng: np.random.Generator, label: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[np.ndarray, dict[str, Any]]:
    """One HxWx3 uint8 image of class ``label`` and the attributes drawn (for the caption and ``key.json``)."""
    scale = float(rng.uniform(0.5, 0.9))  # shape diameter as a share of the image side
    radius = scale / 2
    margin = radius + 0.5 / image_size
    center = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
    angle = math.radians(float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    color_name, fg = _pick_color(rng)
    kind = BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=BACKGROUND_WEIGHTS))]
    background, background_word = _background(rng, image_size, kind, fg)
    alpha = _shape_mask(label, image_size, center, radius, angle)
    image = np.clip(np.rint(background * (1 - alpha) + fg * alpha), 0, 255).astype(np.uint8)
    attributes = {
        "shape": SHAPE_CLASSES[label],
        "color": color_name,
        "background": kind,
        "background_word": background_word,
        "scale": round(scale, 4),
        "center": [round(center[0], 4), round(center[1], 4)],
        "rotation_deg": round(math.degrees(angle), 2),
    }
    return image, attributes


def caption_for(rng: np.random.Generator, attributes: dict[str, Any]) -> str:
    size = "small " if attributes["scale"] < 0.62 else "large " if attributes["scale"] > 0.78 else ""
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(
        size=size, color=attributes["color"], shape=attributes["shape"], background=attributes["background_word"]
    )
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)  # "an orange circle", "an arrow"


def _sample(seed: int, split: str, index: int, label: int, image_size: int) -> dict[str, bytes | str | int]:
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image, attributes = render_shape(rng, label, image_size)
    caption = caption_for(rng, attributes)
    return {
        "png": encode_png(image),
        "cls": label,
        "txt": caption,
        "json": json.dumps(attributes, sort_keys=True),
    }


def render_grid(
    *, per_class: int = 12, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE, zoom: int = 3
) -> Image.Image:
    """A preview: one row per class, ``per_class`` training images each, enlarged ``zoom`` times (nearest)."""
    labels = _labels(seed, "train", max(per_class * len(SHAPE_CLASSES) * 4, 400))
    rows = []
    for label in range(len(SHAPE_CLASSES)):
        indices = np.flatnonzero(labels == label)[:per_class]
        row = []
        for i in indices:
            rng = np.random.default_rng([seed, SPLITS.index("train"), int(i)])
            row.append(render_shape(rng, label, image_size)[0])
        rows.append(np.concatenate(row, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)


def _labels(seed: int, split: str, n: int) -> np.ndarray:
    """Balanced labels (n // 10 or one more per class) in a seeded order, so every shard mixes all classes."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1_000_003])
    return rng.permutation(np.arange(n) % len(SHAPE_CLASSES))


# ----------------------------------------------------------------------------------------------------------------
# Writing


def shapes_params(
    *,
    seed: int = 0,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> dict[str, Any]:
    """The full parameter set (recorded in each index's ``source``; equal parameters give equal bytes)."""
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not any(sizes.values()):
        raise ValueError("n_train, n_val and n_test are all 0: nothing to generate")
    if not isinstance(image_size, int) or not 16 <= image_size <= 512:
        raise ValueError(f"image_size must be an integer in 16..512, got {image_size!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return {"generator": "shapes", "version": GENERATOR_VERSION, "seed": seed, **sizes, "image_size": image_size}


def generate_shapes(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    image_size: int = DEFAULT_IMAGE_SIZE,
    maxcount: int = 500,  # 10 training shards: enough streams for 2 ranks x 4 workers
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shapes dataset as shard sets ``train``, ``val``, ``test`` (``png``, ``cls``, ``txt``, ``json``).

    Splits of size 0 are not written. Returns a report like the converters' (written per split and class).
    """
    started = time.perf_counter()
    params = shapes_params(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits = [s for s in SPLITS if sizes[s] > 0]
    check_output_free(out, splits, overwrite)
    report_splits = {}
    for split in splits:
        source = {"converter": "synthetic_shapes", "split": split, "params": params}
        labels = _labels(seed, split, sizes[split])
        width = max(6, len(str(sizes[split] - 1)))
        with ShardSink(
            out, split, maxcount=maxcount, overwrite=overwrite, classes=SHAPE_CLASSES, source=source
        ) as sink:
            for i in tqdm(
                range(sizes[split]), desc=f"shapes {split}", unit="img", disable=not progress, dynamic_ncols=True
            ):
                sink.write(f"{split}_{i:0{width}d}", _sample(seed, split, i, int(labels[i]), image_size))
        report_splits[split] = {
            "written": sink.count,
            "shards": len(sink.shards),
            "index": str(index_path_for(out, split)),
            "per_class": dict(zip(SHAPE_CLASSES, sink.class_counts or [])),
            "skipped": {},
            "converted": {},
        }
    return {
        "converter": "synthetic_shapes",
        "out": str(Path(out)),
        "params": params,
        "splits": report_splits,
        "written": sum(s["written"] for s in report_splits.values()),
        "skipped": {},
        "converted": {},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _cache_is_valid(folder: Path, params: dict[str, Any]) -> bool:
    sizes = {"train": params["n_train"], "val": params["n_val"], "test": params["n_test"]}
    for split, n in sizes.items():
        index_file = index_path_for(folder, split)
        if n == 0:
            continue
        try:
            index = ShardIndex.load(index_file)
        except (ValueError, OSError, KeyError, TypeError):
            return False
        if index.source.get("params") != params or index.total != n:
            return False
        if not all(os.path.exists(s.url) for s in index.shards):
            return False
    return True


def ensure_shapes(cache_dir: str | os.PathLike, *, progress: bool = False, **kw: Any) -> Path:
    """The shapes dataset for these parameters under ``cache_dir``, generated only if not there yet.

    Each parameter set has its own folder ``cache_dir/shapes-<hash>`` (the parameters are also recorded in each
    index's ``source``), so other cached sets are never touched. Generation goes to a temporary folder renamed
    into place, so concurrent callers (several ranks) and interrupted runs never see a half-written set.
    """
    params = shapes_params(**kw)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    target = cache_dir / f"shapes-{digest}"
    if _cache_is_valid(target, params):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        generate_shapes(tmp, progress=progress, **kw)
        if target.exists() and not _cache_is_valid(target, params):
            shutil.rmtree(target)  # an incomplete or edited set of these very parameters
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_is_valid(target, params):  # another process won the race with a valid set: use it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
