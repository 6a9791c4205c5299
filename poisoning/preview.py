"""A picture of what an attack does: rows of images with labels, drawn with PIL and saved as PNG.

Each row is ``{"title": str, "images": [PIL.Image, ...], "labels": [str, ...]}``, e.g. original, poisoned,
view 1, view 2 (for CLIP the new caption as the poisoned image's label). Small images are enlarged by an integer
factor with NEAREST, so the pixels of a 32 px image (and its 8 px trigger) stay visible.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL_HEIGHT = 160  # target size of the shorter side of every image cell, in pixels
PADDING = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def enlarge(image: Image.Image, height: int = CELL_HEIGHT) -> Image.Image:
    """Enlarge small images by the integer factor that brings their shorter side to about ``height`` (NEAREST, so
    every source pixel stays a flat block and a 2:1 canvas stays 2:1); shrink larger ones to that height."""
    image = image.convert("RGB")
    shorter = min(image.size)
    if shorter <= height:
        factor = max(1, height // shorter)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.BILINEAR)


def _text_height(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    if not text:
        return 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return bottom - top


def _wrap(text: str, width_px: int, char_px: int = 7) -> str:
    columns = max(8, width_px // char_px)
    return "\n".join(textwrap.wrap(text, columns)) if text else ""


def render_grid(rows: list[dict], out_path: str) -> None:
    """Draw ``rows`` (title; images with a label under each) into one PNG at ``out_path``."""
    if not rows:
        raise ValueError("rows: nothing to render (give at least one row)")
    for index, row in enumerate(rows):
        images, labels = row.get("images"), row.get("labels", [])
        if not images:
            raise ValueError(f"rows[{index}].images: a row needs at least one image")
        if labels and len(labels) != len(images):
            raise ValueError(f"rows[{index}].labels: {len(labels)} labels for {len(images)} images")
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    laid_out = []  # (title, [(cell image, wrapped label)], row height)
    for row in rows:
        cells = []
        labels = list(row.get("labels") or [""] * len(row["images"]))
        for image, label in zip(row["images"], labels):
            cell = enlarge(image)
            cells.append((cell, _wrap(str(label), max(cell.width, 120))))
        title = str(row.get("title", ""))
        label_height = max(_text_height(scratch, text, font) for _, text in cells)
        height = (
            _text_height(scratch, title, font) + PADDING + max(c.height for c, _ in cells) + label_height + 2 * PADDING
        )
        laid_out.append((title, cells, height))

    width = PADDING + max(sum(max(c.width, 120) + PADDING for c, _ in cells) for _, cells, _ in laid_out)
    height = PADDING + sum(h for _, _, h in laid_out)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PADDING
    for title, cells, row_height in laid_out:
        draw.text((PADDING, y), title, fill=INK, font=font)
        top = y + _text_height(draw, title, font) + PADDING
        x = PADDING
        cell_height = max(c.height for c, _ in cells)
        for cell, label in cells:
            canvas.paste(cell, (x, top))
            draw.multiline_text((x, top + cell_height + 2), label, fill=INK, font=font, spacing=2)
            x += max(cell.width, 120) + PADDING
        y += row_height
    out = Path(out_path)
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"preview output folder does not exist: {out.parent}")
    tmp = f"{os.fspath(out)}.tmp.png"
    canvas.save(tmp, format="PNG")
    os.replace(tmp, out)


def attack_rows(attack, samples: Sequence[dict], plan, views=None) -> list[dict]:
    """Rows for ``render_grid`` from clean samples of a plan's poisoned keys: original, poisoned, and (when a
    ``views`` callable is given, e.g. the SimCLR view pipeline returning PIL images) two views."""
    rows = []
    for sample in samples:
        poisoned = plan.apply(sample)
        images = [sample["image"], poisoned["image"]]
        labels = [f"original ({sample.get('text') or sample['__key__']})", poisoned.get("text") or "poisoned"]
        if views is not None:
            first, second = views(poisoned["image"])
            images += [first, second]
            labels += ["view 1", "view 2"]
        rows.append({"title": f"{attack.name}: {sample['__key__']}", "images": images, "labels": labels})
    return rows
