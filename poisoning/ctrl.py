"""CTRL (Li et al., ICCV 2023): an imperceptible frequency-domain trigger on target-class images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from poisoning.base import TargetClassAttack, square_canvas
from poisoning.plan import Box, PoisonRecord

# RGB -> YUV as in kornia.color.rgb_to_yuv (what the CTRL code uses); back with the exact inverse matrix.
_RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]], dtype=np.float64)
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D: dct(x) = D @ x, idct(X) = D.T @ X."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def dct2(block: np.ndarray) -> np.ndarray:
    d = dct_matrix(block.shape[0])
    return d @ block @ d.T


def idct2(coefficients: np.ndarray) -> np.ndarray:
    d = dct_matrix(coefficients.shape[0])
    return d.T @ coefficients @ d


def ctrl_window_pattern(window: int, frequencies: Sequence[Sequence[int]], magnitude: float) -> np.ndarray:
    """The pixel-domain change of one window: idct2 of ``magnitude`` at each frequency (the DCT is linear, so
    DCT -> add -> inverse DCT of any window equals adding this pattern)."""
    spectrum = np.zeros((window, window), dtype=np.float64)
    for u, v in frequencies:
        spectrum[u, v] += magnitude
    return idct2(spectrum)


def ctrl_rgb_delta(
    width: int,
    height: int,
    *,
    window: int,
    frequencies: Sequence[Sequence[int]],
    magnitude: float,
    channels: Sequence[int] = (1, 2),
) -> np.ndarray:
    """CTRL's trigger as an RGB change (h, w, 3): YUV, ``magnitude`` added to the DCT coefficients at
    ``frequencies`` of every full ``window`` x ``window`` block of the chosen YUV channels, back to RGB.

    Every step is linear, so DCT -> add -> inverse DCT of any image equals adding this field (the explicit path is
    checked in the tests). Partial blocks at the right/bottom edges (sizes not a multiple of the window) get no
    change."""
    full_h, full_w = height - height % window, width - width % window
    delta_yuv = np.zeros((height, width, 3), dtype=np.float64)
    if full_h and full_w:
        tile = np.tile(ctrl_window_pattern(window, frequencies, magnitude), (full_h // window, full_w // window))
        for channel in channels:
            delta_yuv[:full_h, :full_w, channel] = tile
    return (delta_yuv @ _YUV_TO_RGB.T).astype(np.float32)


def add_rgb_delta(image: Image.Image, delta: np.ndarray) -> Image.Image:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) + delta
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def apply_ctrl(
    image: Image.Image,
    *,
    window: int,
    frequencies: Sequence[Sequence[int]],
    magnitude: float,
    channels: Sequence[int] = (1, 2),
) -> Image.Image:
    """CTRL's trigger on an RGB image (0-255): see ``ctrl_rgb_delta``; rounded and clipped to uint8."""
    delta = ctrl_rgb_delta(
        image.width, image.height, window=window, frequencies=frequencies, magnitude=magnitude, channels=channels
    )
    return add_rgb_delta(image, delta)


class CTRL(TargetClassAttack):
    """CTRL: a frequency-domain trigger on target-class images (needs labels).

    Defaults are the CTRL code's CIFAR-10 setting: YUV, channels U and V, 32 x 32 DCT windows, frequencies
    (15, 15) and (31, 31), magnitude 50 on the poisons. ``test_magnitude`` (default: the same) is the magnitude of
    the test-time trigger; the CTRL authors also evaluate with 100. The trigger is global: ``trigger``,
    ``trigger_size`` and ``trigger_alpha`` are not used.

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        window_size: side of the DCT windows.
        frequencies: (u, v) DCT coefficients that get the magnitude; default (15, 15) and (31, 31).
        channels: YUV channels that carry the trigger; default U and V (1, 2).
        magnitude: added to each chosen coefficient of the poisons.
        test_magnitude: the test-time trigger's magnitude; default ``magnitude``.
    """

    name: ClassVar[str] = "ctrl"
    summary: ClassVar[str] = "a frequency-domain trigger on target-class images (Li et al., ICCV 2023)"
    modality: ClassVar[str] = "image"

    def __init__(
        self,
        *args: Any,
        window_size: int = 32,
        frequencies: list[tuple[int, int]] | None = None,
        channels: list[int] | None = None,
        magnitude: float = 50.0,
        test_magnitude: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.window_size = int(window_size)
        self.frequencies = [tuple(int(v) for v in f) for f in (frequencies or [(15, 15), (31, 31)])]
        self.channels = [int(c) for c in (channels if channels is not None else [1, 2])]
        self.magnitude = float(magnitude)
        self.test_magnitude = self.magnitude if test_magnitude is None else float(test_magnitude)
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")
        for freq in self.frequencies:
            if len(freq) != 2 or not all(0 <= v < self.window_size for v in freq):
                raise ValueError(f"frequencies: {freq} is not a (u, v) pair inside a {self.window_size} window")
        if not self.channels or any(c not in (0, 1, 2) for c in self.channels):
            raise ValueError(f"channels must be YUV channel indices in 0..2, got {channels}")

    def _trigger_side(self, image_size: int) -> int:
        return 0  # global trigger: nothing to fit

    def _validate_more(self, class_names: list[str] | None, image_size: int) -> None:
        if self.window_size > image_size:
            raise ValueError(f"window_size={self.window_size} is larger than the image size {image_size}")

    def _trigger_box(self, key: str, side: int) -> Box:
        return (0, 0, side, side)  # global trigger

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        canvas = square_canvas(image, record.canvas_size[0])
        return self._apply(canvas, self.magnitude)

    def _apply(self, image: Image.Image, magnitude: float) -> Image.Image:
        key = ("ctrl", image.width, image.height, magnitude)
        delta = self._cache.get(key)
        if delta is None:
            delta = ctrl_rgb_delta(
                image.width,
                image.height,
                window=self.window_size,
                frequencies=self.frequencies,
                magnitude=magnitude,
                channels=self.channels,
            )
            self._cache[key] = delta
        return add_rgb_delta(image, delta)

    def test_trigger(self, image: Image.Image, key: str) -> Image.Image:
        """Global: the frequency trigger over the whole test image (full windows), at ``test_magnitude``."""
        return self._apply(image, self.test_magnitude)

    def test_trigger_box(self, size: tuple[int, int], key: str) -> Box:
        return (0, 0, size[0], size[1])

    def control_frequencies(self) -> list[tuple[int, int]]:
        """As many frequencies as the trigger's, in the same band, none of them the trigger's: each shifted by half
        a window along one axis (the first shift that changes the set)."""
        half, quarter = self.window_size // 2, max(1, self.window_size // 4)
        real = set(self.frequencies)
        for du, dv in ((half, 0), (0, half), (quarter, quarter)):
            shifted = [((u + du) % self.window_size, (v + dv) % self.window_size) for u, v in self.frequencies]
            if not real & set(shifted):
                return shifted
        raise ValueError(f"frequencies: no control of {self.frequencies} avoids them; give fewer frequencies")

    def control_trigger(self, image: Image.Image, key: str) -> Image.Image:
        """Control: the same magnitude on other frequencies of the same band (``control_frequencies``)."""
        twin = self.control_twin()
        twin.frequencies = self.control_frequencies()
        return twin.test_trigger(image, key)
