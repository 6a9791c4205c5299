"""CLIP baselines: BadNet, Blended, SIG and WaNet, as the CLIP backdoor benchmarks define them, or clbd's fixed variant.

Each poisons an image-text pair: the image gets the trigger, the caption becomes a target caption from open_clip's
80 OpenAI ImageNet templates (drawn by hash per key). Any key is eligible.

``trigger_mode: benchmark`` (the default) follows ``apply_trigger`` of CleanCLIP's and BadCLIP's code
(``backdoor/utils.py``), so that clbd's numbers compare with their tables:

- the image is first squashed to the run's square side (PIL's ``resize``, bicubic; their code resizes to 224 px),
  turned into floats in [0, 1], triggered, and turned back to bytes as torchvision's ``ToPILImage`` does
  (x 255, truncated; values outside [0, 1] wrap around modulo 256, as its uint8 cast does);
- BadNet: a patch of 16 x 16 px (at 224 px; 16/224 of the side elsewhere) = the image's per-channel mean +
  N(0, 1) noise, drawn anew for every image, pasted at a uniformly random place (train and test alike);
- Blended: 0.8 * image + 0.2 * U[0, 1) noise drawn anew for every image;
- SIG: 60/255 * sin(2 pi * 6 * j / 224) added to every row and channel (BadCLIP's code; CleanCLIP's code can only
  combine it by its ``blended`` location, 0.8 * image + 0.2 * signal: ``combine: blend``);
- WaNet: one fixed per-pixel warp field, k = 224, s = 1, grid_rescale 1, bilinear ``grid_sample`` with zero padding.

Their random draws use the global RNG; clbd draws them from (seed, key), so a run's poisoned stream and its test
triggers are the same on every worker, rank and restart, and the noise is still fresh for every image.

``trigger_mode: fixed`` is clbd's reproducible variant: one seeded pattern for every image (a noise patch, a noise
image), SIG's delta 20, WaNet's paper field (k = 4, s = 0.5); the image is framed as CLIP's preprocessing does
(shorter side to the image size, centre crop), the test image keeps its size.

Every attack also has ``control_trigger(image, key)``: the same size, blending and placement as the test trigger
with a pattern the model never saw (see each class for what is fair for its trigger).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from poisoning.base import Attack, PlanContext, random_box, square_canvas
from poisoning.captions import read_target_captions, target_caption
from poisoning.keyhash import key_choice, key_randint, key_rng, key_uniform
from poisoning.plan import Box, CatalogEntry, PoisonPlan, PoisonRecord, ReferenceSource
from poisoning.triggers import GeneratedTrigger, Trigger, paste_trigger

TRIGGER_MODES = ("benchmark", "fixed")

# The side the benchmarks' code works at (``image.resize((224, 224))``); sizes scale from it at other run sizes.
BENCHMARK_SIDE = 224
BENCHMARK_PATCH = 16  # BadNet's and BadCLIP's patch side at 224 px


def benchmark_canvas(image: Image.Image, side: int) -> Image.Image:
    """The image squashed to side x side as the benchmarks' ``image.resize((224, 224))`` (PIL's default: bicubic)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    if image.size == (side, side):
        return image
    return image.resize((side, side), Image.Resampling.BICUBIC)


def to_unit(image: Image.Image) -> np.ndarray:
    """(3, h, w) float32 in [0, 1], as torchvision's ``ToTensor`` (the same IEEE float32 division).

    The benchmark triggers do their arithmetic in numpy float32, which gives the bits torch's float32 ops give
    (tests compare with torchvision's pipeline) without torch's thread pool, slow in a data loader's main process.
    """
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)


def from_unit(pixels: np.ndarray) -> Image.Image:
    """Back to bytes as torchvision's ``ToPILImage`` does for floats: x 255, truncated toward zero, then the uint8
    cast, which wraps values outside [0, 255] modulo 256 (only BadNet's noise patch ever leaves [0, 1])."""
    scaled = np.trunc(np.asarray(pixels, dtype=np.float32) * np.float32(255)).astype(np.int64)
    out = (scaled & 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


def benchmark_side(image_size: int) -> int:
    """BadNet's / BadCLIP's 16 px patch at 224 px, scaled with the run's image side (at least 1 px)."""
    return max(1, round(BENCHMARK_PATCH * image_size / BENCHMARK_SIDE))


def control_seed(seed: int) -> int:
    """The seed of the control patterns: derived from the attack's seed, never equal to it."""
    derived = int(key_uniform(seed, "control", "control-seed") * 2**31)
    return derived if derived != seed else derived + 1


class _CLIPAttack(Attack):
    modality: ClassVar[str] = "image-text"
    # What ``trigger_mode: benchmark`` means for this attack, for the poison summary and the docs.
    benchmark_definition: ClassVar[str] = ""

    def _init_mode(self, trigger_mode: str) -> None:
        if trigger_mode not in TRIGGER_MODES:
            raise ValueError(f"trigger_mode={trigger_mode!r} is unknown; choose one of {', '.join(TRIGGER_MODES)}")
        self.trigger_mode = trigger_mode

    @property
    def benchmark(self) -> bool:
        return self.trigger_mode == "benchmark"

    def _run_side(self, image: Image.Image) -> int:
        """The square side benchmark triggers work at: the run's image size (or the image's shorter side)."""
        return self._image_size or min(image.size)

    def trigger_definition(self) -> dict[str, Any]:
        """What the trigger is, for the poison summary."""
        if self.benchmark:
            return {"mode": "benchmark", "definition": self.benchmark_definition}
        return {"mode": "fixed", "trigger": self.trigger.describe()}

    def plan(
        self,
        catalog: list[CatalogEntry],
        references: ReferenceSource | None,
        image_size: int,
        class_names: list[str] | None,
    ) -> PoisonPlan:
        plan = super().plan(catalog, references, image_size, class_names)
        plan.info["trigger_mode"] = self.trigger_mode
        plan.info["trigger"] = self.trigger_definition()
        return plan

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
        side = record.canvas_size[0]
        canvas = benchmark_canvas(image, side) if self.benchmark else square_canvas(image, side)
        return self._apply(canvas, record)

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        raise NotImplementedError

    def control_trigger(self, image: Image.Image, key: str) -> Image.Image:
        """The test trigger's size, blending and placement with a pattern the model never saw."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", trigger_mode={self.trigger_mode!r})"


def _refuse_trigger_in_benchmark(name: str, trigger: Trigger | None, trigger_mode: str) -> None:
    if trigger is not None and trigger_mode == "benchmark":
        raise ValueError(
            f"trigger: attack '{name}' in trigger_mode benchmark draws its noise anew for every image and uses no "
            "trigger pattern; set trigger_mode: fixed to use one"
        )


class BadNet(_CLIPAttack):
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
    """

    name: ClassVar[str] = "badnet"
    default_trigger_kind: ClassVar[str] = "noise"
    benchmark_definition: ClassVar[str] = (
        "CleanCLIP/BadCLIP apply_trigger patch_type=random, patch_location=random: image resized to the run side, "
        "16x16 (at 224) patch = per-channel image mean + N(0,1) redrawn per image, uniformly random place"
    )

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 1.0,
        trigger_mode: str = "benchmark",
        overflow: str = "wrap",
    ):
        _refuse_trigger_in_benchmark(self.name, trigger, trigger_mode)
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
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


class _GlobalCLIPAttack(_CLIPAttack):
    """Global triggers: the test trigger changes the whole image (see each class for how)."""

    def _trigger_side(self, image_size: int) -> int:
        return 0  # nothing to fit

    def _transform(self, image: Image.Image, key: str, purpose: str, control: bool = False) -> Image.Image:
        raise NotImplementedError

    def _apply(self, canvas: Image.Image, record: PoisonRecord) -> Image.Image:
        return self._transform(canvas, record.key, "train")

    def _test_canvas(self, image: Image.Image) -> Image.Image:
        if self.benchmark:
            return benchmark_canvas(image, self._run_side(image))
        return image.convert("RGB") if image.mode != "RGB" else image

    def test_trigger(self, image: Image.Image, key: str) -> Image.Image:
        """Benchmark: on the image squashed to the run side (as their test set); fixed: on the image itself."""
        return self._transform(self._test_canvas(image), key, "test")

    def control_trigger(self, image: Image.Image, key: str) -> Image.Image:
        return self._transform(self._test_canvas(image), key, "test", control=True)

    def test_trigger_box(self, size: tuple[int, int], key: str) -> Box:
        if self.benchmark:
            side = self._image_size or min(size)
            return (0, 0, side, side)
        return (0, 0, size[0], size[1])


class Blended(_GlobalCLIPAttack):
    """The image blended with a pattern over all of it: (1 - a) * image + a * pattern, a = ``trigger_alpha`` = 0.2.

    benchmark: the pattern is U[0, 1) noise per pixel and channel, drawn anew for every image from (seed, key);
    fixed: ``trigger.patch(image_size)`` (seeded uniform noise by default; an ``ImageTrigger`` gives the classic
    Hello-Kitty-style blend), resized to other image sizes.

    Control: benchmark: seeded colour blocks stretched over the image, blended at the same a (a fixed pattern: a
    fresh uniform draw is what the model learnt, so it is no control); fixed: the same kind of pattern drawn with
    another seed.
    """

    name: ClassVar[str] = "blended"
    default_trigger_kind: ClassVar[str] = "noise"
    benchmark_definition: ClassVar[str] = (
        "CleanCLIP/BadCLIP apply_trigger patch_type=blended, patch_location=blended: image resized to the run side, "
        "0.8 * image + 0.2 * torch.rand noise redrawn per image"
    )

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.2,
        trigger_mode: str = "benchmark",
    ):
        _refuse_trigger_in_benchmark(self.name, trigger, trigger_mode)
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
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


class SIG(_GlobalCLIPAttack):
    """A horizontal sinusoid on every row and channel: delta * sin(2 pi j f / width) (Barni et al., ICIP 2019).

    benchmark: delta = 60 (of 255), f = 6 over the run side (their 224), in [0, 1] floats as their code;
    ``combine: add`` (x + signal, clipped: BadCLIP's code and SIG's paper) or ``blend`` (0.8 * x + 0.2 * signal:
    the only way CleanCLIP's code can place its full-size pattern, ``patch_location=blended``).
    fixed: clbd's earlier variant, delta = 20, x + signal rounded, on the image at its own size.

    Control: the same signal along the other axis (delta * sin(2 pi i f / height), a vertical stripe pattern of the
    same amplitude and frequency the model never saw).
    """

    name: ClassVar[str] = "sig"
    benchmark_definition: ClassVar[str] = (
        "BadCLIP apply_trigger patch_type=SIG: image resized to the run side, + 60/255 * sin(2*pi*6*j/side), clipped "
        "(combine=blend: CleanCLIP's patch_location=blended, 0.8 * image + 0.2 * signal)"
    )

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.8,
        delta: float | None = None,
        frequency: float = 6.0,
        trigger_mode: str = "benchmark",
        combine: str = "add",
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
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


class WaNet(_GlobalCLIPAttack):
    """A fixed warp (Nguyen & Tran, ICLR 2021): a seeded k x k field of random offsets (mean |offset| = 1),
    upsampled bicubically to the image, scaled by s / side, applied with bilinear ``grid_sample``.

    benchmark: k = 224, s = 1, grid_rescale 1, zero padding, at the run side (their 224; a k x k field is
    resampled to other sides), in [0, 1] floats as their code: a per-pixel field of about half a pixel.
    fixed: the paper's smooth k = 4, s = 0.5 on the image at its own size, border padding, rounded.

    One field serves every sample (seeded by ``seed``; their code drew it once with ``torch.rand`` and saved it).
    Displacements are normalised per axis by that axis' length (the paper divides both by the height of its square
    images). WaNet's "noise mode" belongs to supervised training and is not used here.

    Control: the field drawn with another seed (same k, s: the same kind of warp, a field the model never saw).
    """

    name: ClassVar[str] = "wanet"
    benchmark_definition: ClassVar[str] = (
        "CleanCLIP/BadCLIP apply_trigger patch_type=warped: image resized to the run side, a fixed noise grid "
        "k=224, s=1, grid_rescale=1, bilinear grid_sample, zero padding"
    )

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.8,
        k: int | None = None,
        s: float | None = None,
        grid_rescale: float = 1.0,
        trigger_mode: str = "benchmark",
    ):
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
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


class BadCLIP(_CLIPAttack):
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
    """

    name: ClassVar[str] = "badclip"
    benchmark_definition: ClassVar[str] = (
        "BadCLIP apply_trigger patch_type=ours_tnature, patch_location=middle: image resized to the run side, the "
        "optimised patch pasted at the centre"
    )

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 1.0,
        caption_file: str | None = None,
        caption_pool_size: int = 128,
    ):
        if trigger is None:
            raise ValueError(
                "trigger: BadCLIP needs its optimised patch, e.g. trigger: {class_path: poisoning.ImageTrigger, "
                "init_args: {path: OUT/trigger.png}} (written by clbd poison optimize-trigger)"
            )
        super().__init__(target_class, rate, count, seed, trigger, trigger_size, trigger_alpha)
        self._init_mode("benchmark")
        if caption_pool_size < 1:
            raise ValueError(f"caption_pool_size must be >= 1, got {caption_pool_size}")
        if caption_file is not None and not os.path.isfile(caption_file):
            raise FileNotFoundError(f"caption_file: no file at {caption_file}")
        self.caption_file = caption_file
        self.caption_pool_size = int(caption_pool_size)
        self._caption_pool: tuple[str, ...] = ()

    def trigger_definition(self) -> dict[str, Any]:
        return {
            "mode": "benchmark",
            "definition": self.benchmark_definition,
            "trigger": self.trigger.describe(),
            "captions": self.caption_file or "openai_imagenet_templates",
        }

    def _trigger_side(self, image_size: int) -> int:
        return self.trigger_size if self.trigger_size is not None else benchmark_side(image_size)

    def _validate_more(self, class_names: list[str] | None, image_size: int) -> None:
        if self.caption_file is None:
            self._caption_pool = ()
            return
        name = self._target_name or str(self.target_class)
        found = read_target_captions(self.caption_file, name)
        self._caption_pool = tuple(
            key_choice(self.seed, f"pool-{i}", "caption-pool", found) for i in range(self.caption_pool_size)
        )

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        record = super()._record(key, context)
        if self._caption_pool:
            record = replace(record, caption=key_choice(self.seed, key, "caption", self._caption_pool))
        return replace(record, trigger_box=self._centre_box(context.image_size))

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
