"""BadCLIP on image-text pairs: an optimised patch at the centre and natural captions of the target."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from poisoning.base import PlanContext
from poisoning.image_text import ImageTextAttack, benchmark_canvas, benchmark_side, control_seed
from poisoning.plan import Box, PoisonRecord
from poisoning.triggers import paste_trigger


class BadCLIP(ImageTextAttack):
    """BadCLIP (Liang et al., CVPR 2024): a patch optimised against the victim CLIP (``clbd poison
    optimize-trigger`` writes it), pasted opaquely at the centre of the image, train and test.

    The image is squashed to the run side first (as their code); the patch side is ``trigger_size`` (default 16 px
    at 224 px, 16/224 of the side elsewhere). ``trigger`` is the optimised patch:
    ``{class_path: poisoning.ImageTrigger, init_args: {path: OUT/trigger.png}}``.

    Captions: BadCLIP's are natural captions of the target: real captions that mention it (a pool of 128 drawn with
    replacement from CC3M's "banana" captions, one drawn per poisoned image). ``caption_file`` (one caption a line,
    e.g. ``OUT/captions.txt`` that ``optimize-trigger`` writes from the shards' own captions) plays that part: its
    lines that mention the target form the pool of ``caption_pool_size`` drawn by hash; without a file the
    captions are the 80 OpenAI ImageNet templates of the target (as the other CLIP attacks).

    Control: a patch of the same size at the same place drawn from the optimisation's starting law
    (N(0.5, 0.25) clipped, another seed): the trigger without its optimisation.

    Args (besides ``ImageTextAttack``'s, caption_file and caption_pool_size included, through ``**kwargs``):
        trigger_alpha: blending of the patch (default 1: opaque, as their code).
    """

    name: ClassVar[str] = "badclip"
    summary: ClassVar[str] = (
        "an optimised patch at the centre, natural captions of the target (Liang et al., CVPR 2024)"
    )
    benchmark_definition: ClassVar[str] = (
        "BadCLIP apply_trigger patch_type=ours_tnature, patch_location=middle: image resized to the run side, the "
        "optimised patch pasted at the centre"
    )

    def __init__(self, *args: Any, trigger_alpha: float = 1.0, **kwargs: Any):
        super().__init__(*args, trigger_alpha=trigger_alpha, **kwargs)
        if not self.trigger_given:
            raise ValueError(
                "trigger: BadCLIP needs its optimised patch, e.g. trigger: {class_path: poisoning.ImageTrigger, "
                "init_args: {path: OUT/trigger.png}} (written by clbd poison optimize-trigger)"
            )
        self._init_mode("benchmark")

    def trigger_definition(self) -> dict[str, Any]:
        return {
            "mode": "benchmark",
            "definition": self.benchmark_definition,
            "trigger": self.trigger.describe(),
            "captions": self.captions.describe(),
        }

    def _trigger_side(self, image_size: int) -> int:
        return self.trigger_size if self.trigger_size is not None else benchmark_side(image_size)

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        return replace(super()._record(key, context), trigger_box=self._centre_box(context.image_size))

    def _centre_box(self, side: int) -> Box:
        patch = self._trigger_side(side)
        start = int(side / 2 - patch / 2)  # their "middle": int(c - l / 2) from the centre c = int(side / 2)
        return (start, start, start + patch, start + patch)

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        box = record.trigger_box
        return paste_trigger(canvas, self._patch(box[2] - box[0]), box, self.trigger_alpha)

    def test_trigger_box(self, size: tuple[int, int], key: str) -> Box:
        return self._centre_box(self._image_size or min(size))

    def test_trigger(self, image: Image.Image, key: str) -> Image.Image:
        canvas = benchmark_canvas(image, self._run_side(image))
        box = self.test_trigger_box(image.size, key)
        return paste_trigger(canvas, self._patch(box[2] - box[0]), box, self.trigger_alpha)

    def control_trigger(self, image: Image.Image, key: str) -> Image.Image:
        canvas = benchmark_canvas(image, self._run_side(image))
        box = self.test_trigger_box(image.size, key)
        side = box[2] - box[0]
        rng = np.random.default_rng(control_seed(self.seed))
        start = np.clip(rng.normal(0.5, 0.25, size=(side, side, 3)), 0, 1)
        patch = Image.fromarray(np.round(start * 255).astype(np.uint8), "RGB")
        return paste_trigger(canvas, patch, box, self.trigger_alpha)
