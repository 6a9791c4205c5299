"""SimCLR baselines beside Noisy Alignment: SSLBKD, CorruptEncoder and CTRL.

- SSLBKD (Saha et al., CVPR 2022): the trigger patch pasted at a random place on target-class images.
- CorruptEncoder (Zhang et al., CVPR 2024): a reference object pasted on a background (the stream's sample), the
  trigger in the remaining part; layout after the authors' ``generate_poisoned_images.py``.
- CTRL (Li et al., ICCV 2023): an imperceptible frequency-domain trigger on target-class images.

Poisoned images of SSLBKD and CTRL are the stream's image framed as a square of the run's image size (shorter side
resized, centre crop), so the manifest boxes are exact in the canvas the view pipeline receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from PIL import Image

from poisoning.base import Attack, PlanContext, ReferencePoolAttack, random_box, square_canvas
from poisoning.keyhash import key_choice, key_uniform
from poisoning.plan import Box, CatalogEntry, PoisonRecord
from poisoning.triggers import Trigger, paste_trigger


class SSLBKD(Attack):
    """Trigger patch at a uniformly random place on target-class images (needs labels).

    Only keys whose label is the target are eligible, so ``rate`` is a fraction of the target class.
    Opaque by default (trigger_alpha=1), as in the authors' code.
    """

    name: ClassVar[str] = "sslbkd"
    modality: ClassVar[str] = "image"
    needs_labels: ClassVar[bool] = True

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 1.0,
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)

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
    """

    name: ClassVar[str] = "corrupt_encoder"
    modality: ClassVar[str] = "image"

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 1.0,
        reference_pool_size: int | None = 1200,
        reference_dir: str | None = None,
        area_ratio: float = 2.0,
        object_margin: float = 0.05,
        trigger_margin: float = 0.25,
        canvas_size: int | None = None,
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
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


# -- CTRL ------------------------------------------------------------------------------------------------------
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


class CTRL(Attack):
    """CTRL: a frequency-domain trigger on target-class images (needs labels).

    Defaults are the CTRL code's CIFAR-10 setting: YUV, channels U and V, 32 x 32 DCT windows, frequencies
    (15, 15) and (31, 31), magnitude 50 on the poisons. ``test_magnitude`` (default: the same) is the magnitude of
    the test-time trigger; the CTRL authors also evaluate with 100. The trigger is global: ``trigger``,
    ``trigger_size`` and ``trigger_alpha`` are not used.
    """

    name: ClassVar[str] = "ctrl"
    modality: ClassVar[str] = "image"
    needs_labels: ClassVar[bool] = True

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.8,
        window_size: int = 32,
        frequencies: list[tuple[int, int]] | None = None,
        channels: list[int] | None = None,
        magnitude: float = 50.0,
        test_magnitude: float | None = None,
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
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
            trigger_box=canvas,
            reference_box=canvas,
        )

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
