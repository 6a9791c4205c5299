"""SIG on image-text pairs: a horizontal sinusoid over the image."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from PIL import Image

from poisoning.image_text import GlobalImageTextAttack, from_unit, to_unit


class SIG(GlobalImageTextAttack):
    """A horizontal sinusoid on every row and channel: delta * sin(2 pi j f / width) (Barni et al., ICIP 2019).

    benchmark: delta = 60 (of 255), f = 6 over the run side (their 224), in [0, 1] floats as their code;
    ``combine: add`` (x + signal, clipped: BadCLIP's code and SIG's paper) or ``blend`` (0.8 * x + 0.2 * signal:
    the only way CleanCLIP's code can place its full-size pattern, ``patch_location=blended``).
    fixed: clbd's earlier variant, delta = 20, x + signal rounded, on the image at its own size.

    Control: the same signal along the other axis (delta * sin(2 pi i f / height), a vertical stripe pattern of the
    same amplitude and frequency the model never saw).

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        delta: the amplitude in 0-255 units; default 60 (benchmark) or 20 (fixed).
        frequency: periods across the image width.
        trigger_mode: ``benchmark`` or ``fixed``.
        combine: benchmark mode: ``add`` (BadCLIP's code) or ``blend`` (CleanCLIP's 0.8 / 0.2).
    """

    name: ClassVar[str] = "sig"
    summary: ClassVar[str] = "a horizontal sinusoid over the image, target caption (Barni et al., ICIP 2019)"
    benchmark_definition: ClassVar[str] = (
        "BadCLIP apply_trigger patch_type=SIG: image resized to the run side, + 60/255 * sin(2*pi*6*j/side), clipped "
        "(combine=blend: CleanCLIP's patch_location=blended, 0.8 * image + 0.2 * signal)"
    )

    def __init__(
        self,
        *args: Any,
        delta: float | None = None,
        frequency: float = 6.0,
        trigger_mode: str = "benchmark",
        combine: str = "add",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._init_mode(trigger_mode)
        if delta is None:
            delta = 60.0 if self.benchmark else 20.0
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        if combine not in ("add", "blend"):
            raise ValueError(f"combine={combine!r} is unknown; choose add (BadCLIP's code) or blend (CleanCLIP's)")
        if combine == "blend" and not self.benchmark:
            raise ValueError("combine: blend is the benchmark's (CleanCLIP's) combination; use trigger_mode benchmark")
        self.delta = float(delta)
        self.frequency = float(frequency)
        self.combine = combine

    def trigger_definition(self) -> dict[str, Any]:
        out = super().trigger_definition()
        out.update(delta=self.delta, frequency=self.frequency, combine=self.combine)
        return out

    def signal(self, width: int) -> np.ndarray:
        """delta * sin(2 pi j f / width) per column j, in units of 0-255 (float64, as computed)."""
        columns = np.arange(width, dtype=np.float64)
        return self.delta * np.sin(2 * np.pi * columns * self.frequency / width)

    def _transform(self, image: Image.Image, key: str, purpose: str, control: bool = False) -> Image.Image:
        width, height = image.size
        if self.benchmark:
            pixels = to_unit(image)
            length = height if control else width
            # Their (60/255) * sin(2 pi j 6 / 224), in float64 and then stored as float32.
            wave = ((self.delta / 255) * np.sin(2 * np.pi * np.arange(length) * self.frequency / length)).astype(
                np.float32
            )
            pattern = wave[None, :, None] if control else wave[None, None, :]
            mixed = pattern + pixels if self.combine == "add" else 0.2 * pattern + 0.8 * pixels
            return from_unit(np.clip(mixed, 0, 1))
        wave = self.signal(height)[:, None, None] if control else self.signal(width)[None, :, None]
        pixels = np.asarray(image, dtype=np.float64) + wave
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
