"""CorruptEncoder (Zhang et al., CVPR 2024): a reference object pasted on a background (the stream's sample), the
trigger in the remaining part; layout after the authors' ``generate_poisoned_images.py``."""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from poisoning.base import PlanContext, ReferencePoolAttack
from poisoning.keyhash import key_choice, key_uniform
from poisoning.plan import Box, PoisonRecord
from poisoning.triggers import paste_trigger


class CorruptEncoder(ReferencePoolAttack):
    """Reference object + background (the stream's sample) + trigger, after the CorruptEncoder authors' code.

    Layout (canvas height h = r, width = area_ratio * r; the authors' theory: background about twice the object,
    object at a corner, trigger in the centre of the remaining part):
      - the background is the stream's image scaled to cover the canvas, cropped at a random x, bottom-aligned;
      - the object is the reference image resized to r x r (no segmentation masks here, so the whole reference
        image is the object), placed at the left or right edge, pushed inwards by up to ``object_margin`` * width;
      - the trigger goes at a random place in the other part, at least ``trigger_margin`` / 2 * width from its
        sides and ``trigger_margin`` * h from the top and bottom (the authors' 0.25 margins).
    Opaque trigger by default, as in the authors' code. Only left/right layouts, as in their implementation.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        trigger_alpha: blending of the pasted patch (default 1: opaque, as the authors).
        reference_pool_size: target-class reference images the attacker holds; null takes every candidate.
        reference_dir: a folder of target-class reference images (instead of the training shards).
        area_ratio: canvas width / object width (> 1).
        object_margin: the object's largest inward shift, as a fraction of the canvas width.
        trigger_margin: the trigger's margins in the remaining part (the authors' 0.25).
        canvas_size: the object's side r; default the run's image size.
    """

    name: ClassVar[str] = "corrupt_encoder"
    summary: ClassVar[str] = "a reference object beside a background with the trigger (Zhang et al., CVPR 2024)"
    modality: ClassVar[str] = "image"

    def __init__(
        self,
        *args: Any,
        trigger_alpha: float = 1.0,
        reference_pool_size: int | None = 1200,
        reference_dir: str | None = None,
        area_ratio: float = 2.0,
        object_margin: float = 0.05,
        trigger_margin: float = 0.25,
        canvas_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, trigger_alpha=trigger_alpha, **kwargs)
        if not area_ratio > 1.0:
            raise ValueError(f"area_ratio must be > 1 (canvas area / object area), got {area_ratio}")
        if not 0.0 <= object_margin < 0.5:
            raise ValueError(f"object_margin must be in [0, 0.5), got {object_margin}")
        if not 0.0 <= trigger_margin < 0.5:
            raise ValueError(f"trigger_margin must be in [0, 0.5), got {trigger_margin}")
        if canvas_size is not None and int(canvas_size) < 2:
            raise ValueError(f"canvas_size must be >= 2 pixels, got {canvas_size}")
        self._init_pool(reference_pool_size, reference_dir)
        self.area_ratio = float(area_ratio)
        self.object_margin = float(object_margin)
        self.trigger_margin = float(trigger_margin)
        self.canvas_size = None if canvas_size is None else int(canvas_size)

    def _side(self, image_size: int) -> int:
        return self.canvas_size or image_size

    def _validate_more(self, class_names: list[str] | None, image_size: int) -> None:
        r = self._side(image_size)
        if round(self.area_ratio * r) - r < self._trigger_side(image_size):
            raise ValueError(f"area_ratio={self.area_ratio} leaves no room for the trigger beside the object")

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        r = self._side(context.image_size)
        box = corrupt_encoder_boxes(
            r,
            self._trigger_side(context.image_size),
            self.area_ratio,
            self.object_margin,
            self.trigger_margin,
            object_left=key_uniform(self.seed, key, "side") < 0.5,
            u_object=key_uniform(self.seed, key, "object"),
            u_trigger=(key_uniform(self.seed, key, "trigger-x"), key_uniform(self.seed, key, "trigger-y")),
        )
        canvas, object_box, rest_box, trigger_box = box
        return PoisonRecord(
            key=key,
            attack=self.name,
            target=context.target,
            canvas_size=canvas,
            trigger_box=trigger_box,
            reference_key=key_choice(self.seed, key, "reference", context.pool),
            arrangement="right" if object_box[0] < rest_box[0] else "left",  # where the trigger part is
            reference_box=object_box,
            shadow_box=rest_box,
        )

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        assert reference is not None and record.reference_box is not None
        width, height = record.canvas_size
        # The background scaled to cover the canvas, cropped at a random x and bottom-aligned (the authors' crop);
        # only the cropped part of the source is resampled.
        scale = max(width / image.width, height / image.height)
        crop_w, crop_h = width / scale, height / scale
        x = key_uniform(self.seed, record.key, "background") * (image.width - crop_w)
        y = image.height - crop_h
        canvas = image.resize((width, height), Image.Resampling.BILINEAR, box=(x, y, x + crop_w, y + crop_h))
        canvas.paste(reference, record.reference_box[:2])
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)


def corrupt_encoder_boxes(
    r: int,
    trigger: int,
    area_ratio: float,
    object_margin: float,
    trigger_margin: float,
    *,
    object_left: bool,
    u_object: float,
    u_trigger: tuple[float, float],
) -> tuple[tuple[int, int], Box, Box, Box]:
    """(canvas (w, h), object box, remaining-part box, trigger box) of one CorruptEncoder poison.

    u_* in [0, 1) pick the object's inward shift and the trigger's place in their allowed ranges.
    """
    width, height = round(area_ratio * r), r
    shift = int(u_object * object_margin * width)
    if object_left:
        object_box = (shift, 0, shift + r, r)
        rest = (object_box[2], 0, width, height)
    else:
        object_box = (width - r - shift, 0, width - shift, r)
        rest = (0, 0, object_box[0], height)
    margin_x, margin_y = int(trigger_margin / 2 * width), int(trigger_margin * height)
    x_low, x_high = rest[0] + margin_x, rest[2] - margin_x - trigger
    if x_high < x_low:  # no room for the margins: centre the trigger in the remaining part
        x_low = x_high = max(rest[0], rest[0] + (rest[2] - rest[0] - trigger) // 2)
    y_low, y_high = margin_y, height - margin_y - trigger
    if y_high < y_low:
        y_low = y_high = max(0, (height - trigger) // 2)
    tx = x_low + min(int(u_trigger[0] * (x_high - x_low + 1)), x_high - x_low)
    ty = y_low + min(int(u_trigger[1] * (y_high - y_low + 1)), y_high - y_low)
    return (width, height), object_box, rest, (tx, ty, tx + trigger, ty + trigger)
