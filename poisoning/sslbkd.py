"""SSLBKD (Saha et al., CVPR 2022): the trigger patch pasted at a random place on target-class images.

Poisoned images are the stream's image framed as a square of the run's image size (shorter side resized, centre
crop), so the manifest boxes are exact in the canvas the view pipeline receives.
"""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from poisoning.base import Attack, PlanContext, random_box, square_canvas
from poisoning.plan import CatalogEntry, PoisonRecord
from poisoning.triggers import paste_trigger


class SSLBKD(Attack):
    """Trigger patch at a uniformly random place on target-class images (needs labels).

    Only keys whose label is the target are eligible, so ``rate`` is a fraction of the target class.
    Opaque by default (trigger_alpha=1), as in the authors' code.

    Args (besides ``Attack``'s, which pass through ``**kwargs``):
        trigger_alpha: blending of the pasted patch (default 1: opaque, as the authors).
    """

    name: ClassVar[str] = "sslbkd"
    summary: ClassVar[str] = "a trigger patch at a random place on target-class images (Saha et al., CVPR 2022)"
    modality: ClassVar[str] = "image"
    needs_labels: ClassVar[bool] = True

    def __init__(
        self,
        *,
        trigger_alpha: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(trigger_alpha=trigger_alpha, **kwargs)

    def _eligible(self, entry: CatalogEntry, context: PlanContext) -> bool:
        return entry.label == context.target_index

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        side = context.image_size
        canvas = (0, 0, side, side)
        return PoisonRecord(
            key=key,
            attack=self.name,
            target=context.target,
            canvas_size=(side, side),
            trigger_box=random_box(canvas, self._trigger_side(side), self.seed, key, "trigger"),
            reference_box=canvas,  # the sample itself is the target-class image
        )

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        canvas = square_canvas(image, record.canvas_size[0])
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)
