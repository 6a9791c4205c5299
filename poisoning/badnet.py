"""BadNet on image-text pairs: a trigger patch at a random place (see ``poisoning.image_text`` for the modes)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from poisoning.base import random_box
from poisoning.image_text import (
    ImageTextAttack,
    benchmark_canvas,
    benchmark_side,
    control_seed,
    from_unit,
    refuse_trigger_in_benchmark,
    to_unit,
)
from poisoning.keyhash import key_randint, key_rng
from poisoning.plan import Box, PoisonRecord
from poisoning.triggers import GeneratedTrigger, paste_trigger


class BadNet(ImageTextAttack):
    """A trigger patch at a uniformly random place, at train and at test time.

    benchmark: a ``trigger_size`` patch (default 16 px at 224 px, 16/224 of the side at other sizes) = the image's
    per-channel mean + N(0, 1), drawn anew per image from (seed, key), at a random place in [0, side - 1 - patch]
    (their ``randint(0, 223 - patch_size)``), pasted opaquely. ``overflow``: ``wrap`` keeps their bytes (the noise
    leaves [0, 1] and their uint8 cast wraps it, so the patch is close to uniform noise); ``clip`` clips to [0, 1].

    fixed: clbd's seeded ``trigger`` (a uniform-noise patch by default) at a random place in training and inside the
    central 0.15-0.85 window at test time, blended with ``trigger_alpha``.

    Control: the same box filled with seeded colour blocks (``GeneratedTrigger('patch')``) in benchmark mode, a
    fixed pattern where the real trigger is fresh noise: a noise patch of any other law is still "a noise patch",
    which is what the model learnt, so it would not control anything. In fixed mode: the same kind of trigger
    with another seed.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        trigger_alpha: blending of the patch (default 1: opaque, as the benchmarks).
        trigger_mode: ``benchmark`` (the CLIP benchmarks' fresh noise patch) or ``fixed`` (clbd's seeded patch).
        overflow: benchmark mode: ``wrap`` (the benchmarks' uint8 bytes) or ``clip`` the noise to [0, 1].
    """

    name: ClassVar[str] = "badnet"
    summary: ClassVar[str] = "a noise patch at a random place, target caption (benchmark or fixed mode)"
    default_trigger_kind: ClassVar[str] = "noise"
    benchmark_definition: ClassVar[str] = (
        "CleanCLIP/BadCLIP apply_trigger patch_type=random, patch_location=random: image resized to the run side, "
        "16x16 (at 224) patch = per-channel image mean + N(0,1) redrawn per image, uniformly random place"
    )

    def __init__(
        self,
        *args: Any,
        trigger_alpha: float = 1.0,
        trigger_mode: str = "benchmark",
        overflow: str = "wrap",
        **kwargs: Any,
    ):
        super().__init__(*args, trigger_alpha=trigger_alpha, **kwargs)
        refuse_trigger_in_benchmark(self.name, self.trigger_given, trigger_mode)
        self._init_mode(trigger_mode)
        if overflow not in ("wrap", "clip"):
            raise ValueError(f"overflow={overflow!r} is unknown; choose wrap (the reference's bytes) or clip")
        self.overflow = overflow

    def trigger_definition(self) -> dict[str, Any]:
        out = super().trigger_definition()
        if self.benchmark:
            out["overflow"] = self.overflow
        return out

    # -- sizes and places ----------------------------------------------------------------------------------------
    def _trigger_side(self, image_size: int) -> int:
        if self.benchmark and self.trigger_size is None:
            return benchmark_side(image_size)
        return super()._trigger_side(image_size)

    def _trigger_room(self, image_size: int) -> int:
        # Their randint(0, 223 - patch) never reaches the last row and column.
        return image_size - 1 if self.benchmark else image_size

    def _benchmark_box(self, side: int, patch: int, key: str, purpose: str) -> Box:
        x = key_randint(self.seed, key, purpose + "-x", 0, side - 1 - patch)
        y = key_randint(self.seed, key, purpose + "-y", 0, side - 1 - patch)
        return (x, y, x + patch, y + patch)

    def _trigger_box(self, key: str, side: int) -> Box:
        if self.benchmark:
            return self._benchmark_box(side, self._trigger_side(side), key, "trigger")
        return random_box((0, 0, side, side), self._trigger_side(side), self.seed, key, "trigger")

    def test_trigger_box(self, size: tuple[int, int], key: str) -> Box:
        """Benchmark: the box on the side x side image ``test_trigger`` returns; fixed: on the image itself."""
        if not self.benchmark:
            return super().test_trigger_box(size, key)
        side = self._image_size or min(size)
        return self._benchmark_box(side, self._trigger_side(side), key, "test")

    # -- pixels --------------------------------------------------------------------------------------------------
    def noise(self, key: str, purpose: str, patch: int) -> np.ndarray:
        """The N(0, 1) draw of one image's patch (3, patch, patch) float32, fixed by (seed, key, purpose)."""
        rng = key_rng(self.seed, key, "badnet-" + purpose)
        return rng.standard_normal((3, patch, patch)).astype(np.float32)

    def _noise_patch(self, canvas: Image.Image, box: Box, key: str, purpose: str) -> Image.Image:
        pixels = to_unit(canvas)
        x0, y0, x1, y1 = box
        # The channel means with torch's float32 reduction, as their ``image.mean((1, 2))``.
        mean = torch.from_numpy(pixels).mean(dim=(1, 2), keepdim=True).numpy()
        values = mean + self.noise(key, purpose, x1 - x0)
        if self.overflow == "clip":
            values = np.clip(values, 0, 1)
        pixels[:, y0:y1, x0:x1] = values
        if self.trigger_alpha >= 1.0:
            return from_unit(pixels)
        return paste_trigger(canvas, from_unit(pixels).crop(box), box, self.trigger_alpha)

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        if self.benchmark:
            return self._noise_patch(canvas, record.trigger_box, record.key, "train")
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)

    def test_trigger(self, image: Image.Image, key: str) -> Image.Image:
        if not self.benchmark:
            return super().test_trigger(image, key)
        canvas = benchmark_canvas(image, self._run_side(image))
        return self._noise_patch(canvas, self.test_trigger_box(image.size, key), key, "test")

    def control_trigger(self, image: Image.Image, key: str) -> Image.Image:
        if self.benchmark and self._control is None:
            # a fixed pattern: another draw of the same noise law would still be "a noise patch", i.e. the trigger
            control = GeneratedTrigger("patch", seed=control_seed(self.seed))
        else:  # the user's control, else the trigger's kind with another seed (Attack.control_pattern)
            control = self.control_pattern()
        if self.benchmark:
            image = benchmark_canvas(image, self._run_side(image))
        else:
            image = image.convert("RGB") if image.mode != "RGB" else image
        box = self.test_trigger_box(image.size, key)
        return paste_trigger(image, control.patch(box[2] - box[0]), box, self.trigger_alpha)
