"""CLIP baselines: BadNet, Blended, WaNet and SIG.

Each poisons an image-text pair: the image (framed as the square CLIP preprocessing sees, shorter side to the
image size then centre crop) gets the trigger, the caption becomes a target caption from open_clip's 80 OpenAI
ImageNet templates (drawn by hash per key). Any key is eligible.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from poisoning.base import Attack, PlanContext, random_box, square_canvas
from poisoning.captions import target_caption
from poisoning.plan import Box, PoisonRecord
from poisoning.triggers import Trigger, paste_trigger


class _CLIPAttack(Attack):
    modality: ClassVar[str] = "image-text"

    def _trigger_box(self, key: str, side: int) -> Box:
        return (0, 0, side, side)  # global triggers cover the canvas

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        side = context.image_size
        return PoisonRecord(
            key=key,
            attack=self.name,
            target=context.target,
            canvas_size=(side, side),
            trigger_box=self._trigger_box(key, side),
            shadow_box=(0, 0, side, side),
            caption=target_caption(context.target_name or str(context.target), self.seed, key),
        )

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        return self._apply(square_canvas(image, record.canvas_size[0]), record)

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        raise NotImplementedError


class BadNet(_CLIPAttack):
    """A trigger patch at a uniformly random place (opaque noise patch by default, as CleanCLIP's BadNet)."""

    name: ClassVar[str] = "badnet"
    default_trigger_kind: ClassVar[str] = "noise"

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

    def _trigger_box(self, key: str, side: int) -> Box:
        return random_box((0, 0, side, side), self._trigger_side(side), self.seed, key, "trigger")

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        side = record.trigger_box[2] - record.trigger_box[0]
        return paste_trigger(canvas, self._patch(side), record.trigger_box, self.trigger_alpha)


class _GlobalCLIPAttack(_CLIPAttack):
    """Global triggers: the test trigger changes the whole image (see each class for how)."""

    def _trigger_side(self, image_size: int) -> int:
        return 0  # nothing to fit

    def _transform(self, image: Image.Image) -> Image.Image:
        raise NotImplementedError

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        return self._transform(canvas)

    def test_trigger(self, image: Image.Image, key: str) -> Image.Image:
        return self._transform(image.convert("RGB") if image.mode != "RGB" else image)

    def test_trigger_box(self, size: tuple[int, int], key: str) -> Box:
        return (0, 0, size[0], size[1])


class Blended(_GlobalCLIPAttack):
    """The trigger pattern stretched over the whole image and blended: (1 - a) * image + a * pattern, a = 0.2.

    The pattern is ``trigger.patch(image_size)`` (seeded uniform noise by default; an ``ImageTrigger`` gives the
    classic Hello-Kitty-style blend), resized to other image sizes.
    """

    name: ClassVar[str] = "blended"
    default_trigger_kind: ClassVar[str] = "noise"

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.2,
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)

    def _pattern(self, size: tuple[int, int]) -> Image.Image:
        key = ("blend", size)
        pattern = self._cache.get(key)
        if pattern is None:
            base = self._image_size or max(size)
            pattern = self.trigger.patch(base)
            if pattern.size != size:
                pattern = pattern.resize(size, Image.Resampling.BILINEAR)
            self._cache[key] = pattern
        return pattern

    def _transform(self, image: Image.Image) -> Image.Image:
        return Image.blend(image, self._pattern(image.size), self.trigger_alpha)


class SIG(_GlobalCLIPAttack):
    """A horizontal sinusoidal signal added to every row and channel: x + delta * sin(2 pi j f / width), clipped.

    SIG's defaults delta = 20, f = 6 (Barni et al. 2019).
    """

    name: ClassVar[str] = "sig"

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.8,
        delta: float = 20.0,
        frequency: float = 6.0,
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        self.delta = float(delta)
        self.frequency = float(frequency)

    def signal(self, width: int) -> np.ndarray:
        columns = np.arange(width, dtype=np.float64)
        return self.delta * np.sin(2 * np.pi * columns * self.frequency / width)

    def _transform(self, image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float64) + self.signal(image.width)[None, :, None]
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


class WaNet(_GlobalCLIPAttack):
    """A fixed smooth warp (Nguyen & Tran, ICLR 2021): a seeded k x k field of random offsets, upsampled bicubically
    to the image, scaled by s, applied with bilinear ``grid_sample``. The paper's k = 4, s = 0.5, grid_rescale 1.

    One field serves every sample (seeded by ``seed``); displacements are normalised per axis by that axis' length
    (the paper divides both by the height of its square images). WaNet's "noise mode" (extra randomly warped
    samples that keep their label) belongs to supervised training and is not used here.
    """

    name: ClassVar[str] = "wanet"

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.8,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s}")
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)

    def control_field(self) -> torch.Tensor:
        """The k x k random offsets (1, 2, k, k), mean |offset| = 1, as WaNet draws them."""
        generator = torch.Generator().manual_seed(self.seed)
        field = torch.rand(1, 2, self.k, self.k, generator=generator, dtype=torch.float64) * 2 - 1
        return field / field.abs().mean()

    def sampling_grid(self, width: int, height: int) -> torch.Tensor:
        key = ("grid", width, height)
        grid = self._cache.get(key)
        if grid is None:
            noise = F.interpolate(self.control_field(), size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # (1, h, w, 2): x offset, y offset
            ys = torch.linspace(-1, 1, height, dtype=torch.float64)
            xs = torch.linspace(-1, 1, width, dtype=torch.float64)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((grid_x, grid_y), dim=-1)[None]
            scale = torch.tensor([self.s / width, self.s / height], dtype=torch.float64)
            grid = torch.clamp((identity + noise * scale) * self.grid_rescale, -1, 1).to(torch.float32)
            self._cache[key] = grid
        return grid

    def _transform(self, image: Image.Image) -> Image.Image:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        warped = F.grid_sample(
            pixels,
            self.sampling_grid(image.width, image.height),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        out = warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        return Image.fromarray(out, "RGB")
