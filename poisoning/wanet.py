"""WaNet on image-text pairs: one fixed warp of the image."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from poisoning.image_text import BENCHMARK_SIDE, GlobalImageTextAttack, control_seed, from_unit, to_unit


class WaNet(GlobalImageTextAttack):
    """A fixed warp (Nguyen & Tran, ICLR 2021): a seeded k x k field of random offsets (mean |offset| = 1),
    upsampled bicubically to the image, scaled by s / side, applied with bilinear ``grid_sample``.

    benchmark: k = 224, s = 1, grid_rescale 1, zero padding, at the run side (their 224; a k x k field is
    resampled to other sides), in [0, 1] floats as their code: a per-pixel field of about half a pixel.
    fixed: the paper's smooth k = 4, s = 0.5 on the image at its own size, border padding, rounded.

    One field serves every sample (seeded by ``seed``; their code drew it once with ``torch.rand`` and saved it).
    Displacements are normalised per axis by that axis' length (the paper divides both by the height of its square
    images). WaNet's "noise mode" belongs to supervised training and is not used here.

    Control: the field drawn with another seed (same k, s: the same kind of warp, a field the model never saw).

    Args (besides ``Attack``'s, which pass through ``*args, **kwargs``):
        k: side of the random offset field; default 224 (benchmark) or 4 (fixed).
        s: warp strength; default 1 (benchmark) or 0.5 (fixed).
        grid_rescale: scale of the sampling grid (WaNet's grid_rescale).
        trigger_mode: ``benchmark`` or ``fixed``.
    """

    name: ClassVar[str] = "wanet"
    summary: ClassVar[str] = "one fixed warp of the image, target caption (Nguyen & Tran, ICLR 2021)"
    benchmark_definition: ClassVar[str] = (
        "CleanCLIP/BadCLIP apply_trigger patch_type=warped: image resized to the run side, a fixed noise grid "
        "k=224, s=1, grid_rescale=1, bilinear grid_sample, zero padding"
    )

    def __init__(
        self,
        *args: Any,
        k: int | None = None,
        s: float | None = None,
        grid_rescale: float = 1.0,
        trigger_mode: str = "benchmark",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._init_mode(trigger_mode)
        k = (BENCHMARK_SIDE if self.benchmark else 4) if k is None else k
        s = (1.0 if self.benchmark else 0.5) if s is None else s
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s}")
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)

    def trigger_definition(self) -> dict[str, Any]:
        out = super().trigger_definition()
        out.update(k=self.k, s=self.s, grid_rescale=self.grid_rescale)
        return out

    def control_field(self, control: bool = False) -> torch.Tensor:
        """The k x k random offsets (1, 2, k, k), mean |offset| = 1, as WaNet draws them (``control``: the
        control's field, from another seed)."""
        generator = torch.Generator().manual_seed(control_seed(self.seed) if control else self.seed)
        dtype = torch.float32 if self.benchmark else torch.float64
        field = torch.rand(1, 2, self.k, self.k, generator=generator, dtype=dtype) * 2 - 1
        return field / field.abs().mean()

    def sampling_grid(self, width: int, height: int, control: bool = False) -> torch.Tensor:
        key = ("grid", width, height, control)
        grid = self._cache.get(key)
        if grid is None:
            dtype = torch.float32 if self.benchmark else torch.float64
            noise = F.interpolate(self.control_field(control), size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # (1, h, w, 2): x offset, y offset
            ys = torch.linspace(-1, 1, height, dtype=dtype)
            xs = torch.linspace(-1, 1, width, dtype=dtype)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((grid_x, grid_y), dim=-1)[None]
            if self.benchmark:
                grid = torch.clamp(
                    (identity + self.s * noise / torch.tensor([width, height])) * self.grid_rescale, -1, 1
                )
            else:
                scale = torch.tensor([self.s / width, self.s / height], dtype=dtype)
                grid = torch.clamp((identity + noise * scale) * self.grid_rescale, -1, 1).to(torch.float32)
            self._cache[key] = grid
        return grid

    def _transform(self, image: Image.Image, key: str, purpose: str, control: bool = False) -> Image.Image:
        grid = self.sampling_grid(image.width, image.height, control)
        if self.benchmark:
            pixels = torch.from_numpy(np.ascontiguousarray(to_unit(image)))[None]
            warped = F.grid_sample(pixels, grid, mode="bilinear", align_corners=True)
            return from_unit(warped[0].numpy())
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        return Image.fromarray(out, "RGB")
