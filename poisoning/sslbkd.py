"""SSLBKD (Saha et al., CVPR 2022): the trigger patch pasted at a random place on target-class images."""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from poisoning.base import TargetClassAttack, random_box, square_canvas
from poisoning.plan import Box, PoisonRecord
from poisoning.triggers import paste_trigger


class SSLBKD(TargetClassAttack):
    """Trigger patch at a uniformly random place on target-class images (needs labels).

    Only keys whose label is the target are eligible, so ``rate`` is a fraction of the target class.
    Opaque by default (trigger_alpha=1), as in the authors' code.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        trigger_alpha: blending of the pasted patch (default 1: opaque, as the authors).
    """

    name: ClassVar[str] = "sslbkd"
    summary: ClassVar[str] = "a trigger patch at a random place on target-class images (Saha et al., CVPR 2022)"
    modality: ClassVar[str] = "image"

    def __init__(
        self,
        *args: Any,
        trigger_alpha: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(*args, trigger_alpha=trigger_alpha, **kwargs)

    def _trigger_box(self, key: str, side: int) -> Box:
        return random_box((0, 0, side, side), self._trigger_side(side), self.seed, key, "trigger")

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        canvas = square_canvas(image, record.canvas_size[0])
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)
