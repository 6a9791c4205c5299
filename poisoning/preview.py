"""A picture of what an attack does: rows of images with labels, drawn with PIL and saved as PNG.

Each row is ``{"title": str, "images": [PIL.Image, ...], "labels": [str, ...]}``, e.g. original, poisoned,
view 1, view 2 (for CLIP the new caption as the poisoned image's label). Small images are enlarged by an integer
factor with NEAREST, so the pixels of a 32 px image (and its 8 px trigger) stay visible.
"""

from __future__ import annotations

import os
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


def wrap_text(text: str, width_px: int, font=None) -> str:
    """``text`` broken into lines no wider than ``width_px`` in ``font`` (measured, not guessed from a character
    count): at spaces, and inside a word only when the word alone is wider than a line. Nothing is cut off."""
    font = font or _font()
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:  # a word wider than the line: broken where it must be
                if line and font.getlength(line + char) > width_px:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return "\n".join(lines).strip("\n")


MIN_WIDTH = 480  # the narrowest picture: room for a heading of a few words per line


def render_grid(rows: list[dict], out_path: str, heading: str = "") -> None:
    """Draw ``rows`` (title; images with a label under each) into one PNG at ``out_path``, under ``heading``.

    Every text is wrapped, never cut: labels to their cell's width, titles and the heading to the picture's."""
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

    laid_out = []  # (title, [(cell image, wrapped label, cell width)])
    for row in rows:
        cells = []
        labels = list(row.get("labels") or [""] * len(row["images"]))
        for image, label in zip(row["images"], labels):
            cell = enlarge(image)
            slot = max(cell.width, 120)
            cells.append((cell, wrap_text(str(label), slot, font), slot))
        laid_out.append((str(row.get("title", "")), cells))

    width = max(MIN_WIDTH, PADDING + max(sum(slot + PADDING for _, _, slot in cells) for _, cells in laid_out))
    text_width = width - 2 * PADDING
    heading = wrap_text(heading, text_width, font) if heading else ""
    heading_height = _text_height(scratch, heading, font) + 2 * PADDING if heading else 0
    heights = []
    for index, (title, cells) in enumerate(laid_out):
        title = wrap_text(title, text_width, font)
        laid_out[index] = (title, cells)
        label_height = max(_text_height(scratch, text, font) for _, text, _ in cells)
        heights.append(
            _text_height(scratch, title, font)
            + PADDING
            + max(c.height for c, _, _ in cells)
            + label_height
            + 2 * PADDING
        )
    height = PADDING + heading_height + sum(heights)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PADDING
    if heading:
        draw.multiline_text((PADDING, y), heading, fill=INK, font=font, spacing=2)
        y += heading_height
        draw.line((PADDING, y - PADDING, width - PADDING, y - PADDING), fill=INK)
    for (title, cells), row_height in zip(laid_out, heights):
        draw.multiline_text((PADDING, y), title, fill=INK, font=font, spacing=2)
        top = y + _text_height(draw, title, font) + PADDING
        x = PADDING
        cell_height = max(c.height for c, _, _ in cells)
        for cell, label, slot in cells:
            canvas.paste(cell, (x, top))
            draw.multiline_text((x, top + cell_height + 2), label, fill=INK, font=font, spacing=2)
            x += slot + PADDING
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
