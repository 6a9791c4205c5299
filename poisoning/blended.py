"""Blended on image-text pairs: the image blended with a pattern over all of it."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from PIL import Image

from poisoning.image_text import GlobalImageTextAttack, control_seed, from_unit, refuse_trigger_in_benchmark, to_unit
from poisoning.keyhash import key_rng
from poisoning.triggers import GeneratedTrigger, Trigger


class Blended(GlobalImageTextAttack):
    """The image blended with a pattern over all of it: (1 - a) * image + a * pattern, a = ``trigger_alpha`` = 0.2.

    benchmark: the pattern is U[0, 1) noise per pixel and channel, drawn anew for every image from (seed, key);
    fixed: ``trigger.patch(image_size)`` (seeded uniform noise by default; an ``ImageTrigger`` gives the classic
    Hello-Kitty-style blend), resized to other image sizes.

    Control: benchmark: seeded colour blocks stretched over the image, blended at the same a (a fixed pattern: a
    fresh uniform draw is what the model learnt, so it is no control); fixed: the same kind of pattern drawn with
    another seed.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        trigger_alpha: the pattern's weight a (default 0.2, as the benchmarks).
        trigger_mode: ``benchmark`` (fresh uniform noise per image) or ``fixed`` (one seeded pattern).
    """

    name: ClassVar[str] = "blended"
    summary: ClassVar[str] = "the image blended with noise over all of it, target caption (benchmark or fixed mode)"
    default_trigger_kind: ClassVar[str] = "noise"
    benchmark_definition: ClassVar[str] = (
        "CleanCLIP/BadCLIP apply_trigger patch_type=blended, patch_location=blended: image resized to the run side, "
        "0.8 * image + 0.2 * torch.rand noise redrawn per image"
    )

    def __init__(
        self,
        *args: Any,
        trigger_alpha: float = 0.2,
        trigger_mode: str = "benchmark",
        **kwargs: Any,
    ):
        super().__init__(*args, trigger_alpha=trigger_alpha, **kwargs)
        refuse_trigger_in_benchmark(self.name, self.trigger_given, trigger_mode)
        self._init_mode(trigger_mode)

    def noise(self, key: str, purpose: str, side: int) -> np.ndarray:
        """The U[0, 1) draw (3, side, side) float32 of one image, fixed by (seed, key, purpose)."""
        rng = key_rng(self.seed, key, "blended-" + purpose)
        return rng.random((3, side, side), dtype=np.float32)

    def _pattern(self, trigger: Trigger, size: tuple[int, int]) -> Image.Image:
        cache_key = ("blend", trigger.describe().__repr__(), size)
        pattern = self._cache.get(cache_key)
        if pattern is None:
            pattern = trigger.patch(self._image_size or max(size))
            if pattern.size != size:
                pattern = pattern.resize(size, Image.Resampling.BILINEAR)
            self._cache[cache_key] = pattern
        return pattern

    def _control_pattern(self) -> Trigger:
        if self.benchmark:
            return GeneratedTrigger("patch", seed=control_seed(self.seed))
        kind = self.trigger.kind if isinstance(self.trigger, GeneratedTrigger) else "noise"
        return GeneratedTrigger(kind, seed=control_seed(self.seed))

    def _transform(self, image: Image.Image, key: str, purpose: str, control: bool = False) -> Image.Image:
        if control:
            return Image.blend(image, self._pattern(self._control_pattern(), image.size), self.trigger_alpha)
        if not self.benchmark:
            return Image.blend(image, self._pattern(self.trigger, image.size), self.trigger_alpha)
        pixels = to_unit(image)
        noise = self.noise(key, purpose, image.width)
        mixed = (self.trigger_alpha * noise) + ((1 - self.trigger_alpha) * pixels)
        return from_unit(np.clip(mixed, 0, 1))
