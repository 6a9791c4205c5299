"""What the image-text (CLIP) baselines share: BadNet, Blended, SIG, WaNet and BadCLIP, as the CLIP backdoor
benchmarks define them, or clbd's fixed variant.

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

from typing import Any, ClassVar

import numpy as np
from PIL import Image

from poisoning.base import Attack, PlanContext, square_canvas
from poisoning.captions import TargetCaptions
from poisoning.keyhash import key_uniform
from poisoning.plan import Box, CatalogEntry, PoisonPlan, PoisonRecord, ReferenceSource

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


class ImageTextAttack(Attack):
    """An attack on image-caption pairs: the image gets the trigger, the caption a target caption."""

    modality: ClassVar[str] = "image-text"
    # What ``trigger_mode: benchmark`` means for this attack, for the poison summary and the docs.
    benchmark_definition: ClassVar[str] = ""

    def __init__(self, *args: Any, caption_file: str | None = None, caption_pool_size: int = 128, **kwargs: Any):
        """``caption_file``, ``caption_pool_size``: natural captions of the target instead of the templates (see
        ``poisoning.captions.TargetCaptions``)."""
        super().__init__(*args, **kwargs)
        self.captions = TargetCaptions(caption_file, caption_pool_size)

    def _validate_more(self, class_names: list[str] | None, image_size: int) -> None:
        self.captions.prepare(self._target_name or str(self.target_class), self.seed)

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
            return {"mode": "benchmark", "definition": self.benchmark_definition, "captions": self.captions.describe()}
        return {"mode": "fixed", "trigger": self.trigger.describe(), "captions": self.captions.describe()}

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
        caption = self.captions.caption(context.target_name or str(context.target), self.seed, key)
        return self._square_record(
            key, context, self._trigger_box(key, side), shadow_box=(0, 0, side, side), caption=caption
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


def refuse_trigger_in_benchmark(name: str, trigger_given: bool, trigger_mode: str) -> None:
    if trigger_given and trigger_mode == "benchmark":
        raise ValueError(
            f"trigger: attack '{name}' in trigger_mode benchmark draws its noise anew for every image and uses no "
            "trigger pattern; set trigger_mode: fixed to use one"
        )


class GlobalImageTextAttack(ImageTextAttack):
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
