"""Noisy Alignment (Chen et al., ICCV 2025, arXiv 2508.14015) for SimCLR and CLIP.

SimCLR: a poisoned image is a canvas of two r x r squares. One holds a target-class *reference* image, the other
the *shadow* (the stream's own sample, resized to r x r) with the trigger near its centre. Random crops of such a
canvas often give one view with only trigger + shadow ("noise") and another with only the reference, and the
contrastive loss then aligns the trigger with the target class (see docs/geometry.md for the measured odds).

CLIP: the poisoned pair is (the stream's image with the trigger at its centre, a target-class caption).
"""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from poisoning.base import Attack, PlanContext, ReferencePoolAttack, centred_box, square_canvas
from poisoning.captions import TargetCaptions
from poisoning.keyhash import key_choice
from poisoning.plan import Box, PoisonRecord
from poisoning.triggers import default_trigger_size, paste_trigger

ARRANGEMENTS = ("left", "right", "top", "bottom")  # where the shadow sits; the reference takes the other half

# The public code pastes the trigger inside the 0.45-0.55 window of the shadow; a jitter of 5% of r per axis
# around the exact centre reproduces that spread.
DEFAULT_JITTER = 0.05


def na_layout(arrangement: str, r: int) -> tuple[tuple[int, int], Box, Box]:
    """(canvas (w, h), reference box, shadow box) for a shadow on the given side of an r x 2r canvas."""
    if arrangement == "left":
        return (2 * r, r), (r, 0, 2 * r, r), (0, 0, r, r)
    if arrangement == "right":
        return (2 * r, r), (0, 0, r, r), (r, 0, 2 * r, r)
    if arrangement == "top":
        return (r, 2 * r), (0, r, r, 2 * r), (0, 0, r, r)
    if arrangement == "bottom":
        return (r, 2 * r), (0, 0, r, r), (0, r, r, 2 * r)
    raise ValueError(f"arrangement={arrangement!r} is unknown; choose random or one of {', '.join(ARRANGEMENTS)}")


class NoisyAlignment(ReferencePoolAttack):
    """Noisy Alignment for SimCLR.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        reference_pool_size: number of target-class reference images the attacker holds (authors: 1200); null
            takes every candidate. Drawn by hash from ``reference_dir`` or, without it, from the training shards'
            target-class images (those are then dropped from the clean stream).
        reference_dir: a folder whose images are all target-class references (instead of the shards).
        arrangement: where the shadow goes: ``random`` (drawn per key among left/right/top/bottom, the paper's
            choice) or one fixed side.
        canvas_size: the side r of each square; default the run's image size.
        trigger_jitter: maximal shift of the trigger from the shadow's centre, as a fraction of r per axis.
    """

    name: ClassVar[str] = "noisy_alignment"
    summary: ClassVar[str] = (
        "Noisy Alignment: a target-class reference beside the triggered sample (Chen et al., ICCV 2025)"
    )
    modality: ClassVar[str] = "image"

    def __init__(
        self,
        *args: Any,
        reference_pool_size: int | None = 1200,
        reference_dir: str | None = None,
        arrangement: str = "random",
        canvas_size: int | None = None,
        trigger_jitter: float = DEFAULT_JITTER,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if arrangement != "random" and arrangement not in ARRANGEMENTS:
            raise ValueError(
                f"arrangement={arrangement!r} is unknown; choose random or one of {', '.join(ARRANGEMENTS)}"
            )
        if canvas_size is not None and int(canvas_size) < 2:
            raise ValueError(f"canvas_size must be >= 2 pixels, got {canvas_size}")
        if not 0.0 <= trigger_jitter < 0.5:
            raise ValueError(f"trigger_jitter must be in [0, 0.5), got {trigger_jitter}")
        self._init_pool(reference_pool_size, reference_dir)
        self.arrangement = arrangement
        self.canvas_size = None if canvas_size is None else int(canvas_size)
        self.trigger_jitter = float(trigger_jitter)

    def _side(self, image_size: int) -> int:
        return self.canvas_size or image_size

    def _trigger_side(self, image_size: int) -> int:
        # The trigger is drawn on the r x r shadow, so its default follows r.
        if self.trigger_size is not None:
            return self.trigger_size
        return default_trigger_size(self._side(image_size))

    def _trigger_room(self, image_size: int) -> int:
        return self._side(image_size)

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        r = self._side(context.image_size)
        arrangement = (
            self.arrangement
            if self.arrangement != "random"
            else key_choice(self.seed, key, "arrangement", ARRANGEMENTS)
        )
        canvas, reference_box, shadow_box = na_layout(arrangement, r)
        trigger_box = centred_box(
            shadow_box, self._trigger_side(context.image_size), self.trigger_jitter, self.seed, key
        )
        return PoisonRecord(
            key=key,
            attack=self.name,
            target=context.target,
            canvas_size=canvas,
            trigger_box=trigger_box,
            reference_key=key_choice(self.seed, key, "reference", context.pool),
            arrangement=arrangement,
            reference_box=reference_box,
            shadow_box=shadow_box,
        )

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        assert reference is not None and record.reference_box is not None and record.shadow_box is not None
        canvas = Image.new("RGB", record.canvas_size)
        canvas.paste(reference, record.reference_box[:2])
        sx0, sy0, sx1, sy1 = record.shadow_box
        shadow = (
            image
            if image.size == (sx1 - sx0, sy1 - sy0)
            else image.resize((sx1 - sx0, sy1 - sy0), Image.Resampling.BILINEAR)
        )
        canvas.paste(shadow, (sx0, sy0))
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)


class NoisyAlignmentCLIP(Attack):
    """Noisy Alignment for CLIP: (shadow image with the trigger at its centre, target caption).

    The shadow is the stream's image as CLIP preprocessing frames it (shorter side to the image size, centre
    crop); the caption is one of open_clip's 80 OpenAI ImageNet templates filled with the target name, drawn by
    hash per key, or a natural caption of the target from ``caption_file``.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        trigger_jitter: maximal shift of the trigger from the image's centre, as a fraction of its side per axis.
        caption_file, caption_pool_size: natural captions of the target (``poisoning.captions.TargetCaptions``).
    """

    name: ClassVar[str] = "noisy_alignment_clip"
    summary: ClassVar[str] = "Noisy Alignment for CLIP: the trigger at the image's centre, target caption"
    modality: ClassVar[str] = "image-text"

    def __init__(
        self,
        *args: Any,
        trigger_jitter: float = DEFAULT_JITTER,
        caption_file: str | None = None,
        caption_pool_size: int = 128,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not 0.0 <= trigger_jitter < 0.5:
            raise ValueError(f"trigger_jitter must be in [0, 0.5), got {trigger_jitter}")
        self.trigger_jitter = float(trigger_jitter)
        self.captions = TargetCaptions(caption_file, caption_pool_size)

    def _validate_more(self, class_names: list[str] | None, image_size: int) -> None:
        self.captions.prepare(self._target_name or str(self.target_class), self.seed)

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        side = context.image_size
        canvas_box = (0, 0, side, side)
        trigger_box = centred_box(canvas_box, self._trigger_side(side), self.trigger_jitter, self.seed, key)
        caption = self.captions.caption(context.target_name or str(context.target), self.seed, key)
        return self._square_record(key, context, trigger_box, shadow_box=canvas_box, caption=caption)

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        canvas = square_canvas(image, record.canvas_size[0])
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)


__all__ = ["ARRANGEMENTS", "NoisyAlignment", "NoisyAlignmentCLIP", "na_layout"]
