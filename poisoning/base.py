"""The ``Attack`` base class: budget, target, trigger, validation, planning and the test-time trigger.

Subclasses say which keys are eligible, lay out one poisoned record per key (``_record``), render it
(``render``) and, when their test trigger is not a patch, override ``test_trigger``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from poisoning.keyhash import key_randint
from poisoning.plan import Box, CatalogEntry, PoisonPlan, PoisonRecord, ReferenceSource, select_keys
from poisoning.references import FolderReferenceSource, draw_pool
from poisoning.triggers import GeneratedTrigger, ImageTrigger, Trigger, default_trigger_size, paste_trigger

MODALITIES = ("image", "image-text")  # what the attack poisons: images, or image-caption pairs

# The authors' test protocol: the test trigger lies inside the central 0.15-0.85 window of the image.
TEST_WINDOW = (0.15, 0.85)

# The default control trigger's seed is the real trigger's seed plus this: a pattern of the same kind that no
# poisoned sample carries.
CONTROL_SEED_OFFSET = 7919

# Up to this many bytes of encoded reference images ride inside the plan (CIFAR: ~1.5 KB per reference).
EMBED_REFERENCES_LIMIT = 32 * 2**20


@dataclass(frozen=True)
class PlanContext:
    """What a record needs besides its key: the run's image size and the resolved target."""

    image_size: int
    target_index: int | None
    target_name: str | None
    pool: tuple[str, ...] = ()

    @property
    def target(self) -> int | str:
        return self.target_name if self.target_name is not None else int(self.target_index)  # type: ignore[arg-type]


class Attack:
    """A data-poisoning attack that the streaming poisoner applies per key.

    Args:
        target_class: the target class, as an index into the data's class names or as a name. CLIP attacks may
            name a class the data does not have (e.g. "banana"); it is only used in the target captions.
        rate: fraction of the eligible keys to poison (each key independently, by hash), in [0, 1].
        count: exact number of eligible keys to poison (those with the smallest hash). Give rate or count.
        seed: fixes every random choice of the attack (selection, layout, references, captions, test triggers).
        trigger: the trigger pattern; a seeded ``GeneratedTrigger`` when not given.
        trigger_size: trigger side in pixels at the run's image size; default 8 px at 32 px images, 50 px at
            224 px (``default_trigger_size``).
        trigger_alpha: blending of pasted triggers, alpha * trigger + (1 - alpha) * image.
    """

    name: ClassVar[str] = "attack"
    summary: ClassVar[str] = ""  # one line for `clbd poison attacks` and the docs
    modality: ClassVar[str] = "image"
    needs_labels: ClassVar[bool] = False  # eligibility or references depend on the target's label index
    default_trigger_kind: ClassVar[str] = "patch"

    def __init__(
        self,
        target_class: int | str,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        trigger: Trigger | None = None,
        trigger_size: int | None = None,
        trigger_alpha: float = 0.8,
    ):
        if isinstance(target_class, bool) or not isinstance(target_class, (int, str)):
            raise ValueError(f"target_class must be a class index or a class name, got {target_class!r}")
        if isinstance(target_class, str) and not target_class.strip():
            raise ValueError("target_class must not be an empty string")
        self.target_class = target_class
        self.rate = None if rate is None else float(rate)
        self.count = None if count is None else int(count)
        self.seed = int(seed)
        self.trigger_given = trigger is not None  # False: the seeded default below
        self.trigger = trigger if trigger is not None else GeneratedTrigger(self.default_trigger_kind, seed=self.seed)
        if not isinstance(self.trigger, Trigger):
            raise ValueError(f"trigger must be a Trigger (GeneratedTrigger or ImageTrigger), got {trigger!r}")
        self.trigger_size = None if trigger_size is None else int(trigger_size)
        self.trigger_alpha = float(trigger_alpha)
        self._image_size: int | None = None
        self._target_index: int | None = None
        self._target_name: str | None = None
        self._cache: dict[Any, Any] = {}
        self._control: Trigger | None = None  # user-supplied control pattern (set_control_trigger)
        self._check_arguments()

    # -- checks ------------------------------------------------------------------------------------------------
    def _check_arguments(self) -> None:
        if (self.rate is None) == (self.count is None):
            raise ValueError(
                f"attack '{self.name}': give exactly one of rate or count (got rate={self.rate}, count={self.count})"
            )
        if self.rate is not None and not (0.0 <= self.rate <= 1.0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.trigger_size is not None and self.trigger_size < 1:
            raise ValueError(f"trigger_size must be >= 1 pixel, got {self.trigger_size}")
        if not 0.0 <= self.trigger_alpha <= 1.0:
            raise ValueError(f"trigger_alpha must be in [0, 1], got {self.trigger_alpha}")

    def validate(self, modality: str, class_names: list[str] | None, image_size: int) -> None:
        """Raise ValueError naming the field when this attack cannot run on this data; call before training."""
        self._check_arguments()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        if modality != self.modality:
            raise ValueError(f"attack '{self.name}' poisons {self.modality} data, but this run's data is {modality}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 2:
            raise ValueError(f"image_size must be an integer >= 2, got {image_size!r}")
        self._resolve_target(class_names)
        side = self._trigger_side(image_size)
        room = self._trigger_room(image_size)
        if side > room:
            raise ValueError(
                f"trigger_size={side} px is larger than the {room} px it must fit in at image size {image_size}"
            )
        self._validate_more(class_names, image_size)
        self._image_size = image_size

    def _validate_more(self, class_names: list[str] | None, image_size: int) -> None:
        """Attack-specific checks."""

    def _trigger_room(self, image_size: int) -> int:
        """The side the training trigger must fit in (the image; NA: the shadow square)."""
        return image_size

    def _requires_labels(self) -> bool:
        return self.needs_labels

    def target_index(self, class_names: list[str] | None) -> int | None:
        """The target as an index into ``class_names`` (e.g. the evaluation classes, for ASR), or None when the
        target is a name that is not one of them (a free CLIP target text such as "banana"). No side effects."""
        target = self.target_class
        if isinstance(target, int):
            if class_names is not None and not 0 <= target < len(class_names):
                raise ValueError(
                    f"target_class={target} is out of range: the data has {len(class_names)} classes "
                    f"(0..{len(class_names) - 1})"
                )
            return target
        names = list(class_names) if class_names is not None else []
        return names.index(target) if target in names else None

    def _resolve_target(self, class_names: list[str] | None) -> tuple[int | None, str | None]:
        target = self.target_class
        if class_names is not None:
            class_names = list(class_names)
            if isinstance(target, int):
                if not 0 <= target < len(class_names):
                    raise ValueError(
                        f"target_class={target} is out of range: the data has {len(class_names)} classes "
                        f"(0..{len(class_names) - 1})"
                    )
                index, name = target, class_names[target]
            elif target in class_names:
                index, name = class_names.index(target), target
            elif self._requires_labels():
                raise ValueError(
                    f"target_class={target!r} is not a class of the data; classes: {', '.join(class_names[:20])}"
                    + (" ..." if len(class_names) > 20 else "")
                )
            elif self.modality == "image-text":
                index, name = None, target  # a free target text, e.g. "banana"
            else:
                raise ValueError(
                    f"target_class={target!r} is not a class of the data; classes: {', '.join(class_names[:20])}"
                )
        else:
            if self._requires_labels():
                raise ValueError(
                    f"target_class={target!r}: attack '{self.name}' needs class labels, but the data has no classes"
                )
            if isinstance(target, int) and self.modality == "image-text":
                raise ValueError(
                    f"target_class={target} is an index but the data has no class names; give the target class "
                    "as a name (e.g. 'banana') so the target captions can say it"
                )
            index, name = (target, None) if isinstance(target, int) else (None, target)
        self._target_index, self._target_name = index, name
        return index, name

    # -- sizes -------------------------------------------------------------------------------------------------
    def _trigger_side(self, image_size: int) -> int:
        """Trigger side at the run's image size."""
        return self.trigger_size if self.trigger_size is not None else default_trigger_size(image_size)

    def _scaled_trigger_side(self, width: int, height: int) -> int:
        """Trigger side on an image of this size: the run's trigger scaled with the image's shorter side."""
        base = self._image_size or min(width, height)
        # The training trigger covers trigger_side / room of the region it sits in (the image; NA: the shadow).
        fraction = self._trigger_side(base) / self._trigger_room(base)
        return max(1, min(round(fraction * min(width, height)), width, height))

    def _patch(self, side: int) -> Image.Image:
        cache_key = ("patch", side)
        patch = self._cache.get(cache_key)
        if patch is None:
            patch = self.trigger.patch(side)
            self._cache[cache_key] = patch
        return patch

    # -- planning ----------------------------------------------------------------------------------------------
    def _eligible(self, entry: CatalogEntry, context: PlanContext) -> bool:
        return True

    def _reference_pool(
        self, references: ReferenceSource | None, context: PlanContext
    ) -> tuple[tuple[str, ...], int, ReferenceSource | None, dict[str, bytes]]:
        """(pool keys, rejected count, the source, the pool's encoded bytes); no pool by default."""
        return (), 0, None, {}

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        raise NotImplementedError

    def _square_record(self, key: str, context: PlanContext, trigger_box: Box, **fields: Any) -> PoisonRecord:
        """The record of a poison that is the stream's image framed as a square of the run's image size."""
        side = context.image_size
        return PoisonRecord(
            key=key,
            attack=self.name,
            target=context.target,
            canvas_size=(side, side),
            trigger_box=trigger_box,
            **fields,
        )

    def plan(
        self,
        catalog: Sequence[CatalogEntry],
        references: ReferenceSource | None,
        image_size: int,
        class_names: list[str] | None,
    ) -> PoisonPlan:
        """Choose the poisoned keys of ``catalog`` and lay out each one; see ``PoisonPlan``."""
        self.validate(self.modality, class_names, image_size)
        context = PlanContext(image_size, self._target_index, self._target_name)
        pool, rejected, source, pool_bytes = self._reference_pool(references, context)
        context = PlanContext(image_size, self._target_index, self._target_name, tuple(pool))
        catalog_keys = {entry.key for entry in catalog}
        excluded = frozenset(k for k in pool if k in catalog_keys)
        eligible = {entry.key for entry in catalog if entry.key not in excluded and self._eligible(entry, context)}
        try:
            chosen = select_keys(eligible, self.seed, rate=self.rate, count=self.count)
        except ValueError as exc:
            raise ValueError(f"attack '{self.name}': {exc}") from None
        poisoned = {key: self._record(key, context) for key in chosen}
        # The references the records use travel inside the plan (read once, above) unless they are too many
        # bytes; then workers load them lazily from the source.
        used = sorted({r.reference_key for r in poisoned.values() if r.reference_key is not None})
        embedded = {k: pool_bytes[k] for k in used if k in pool_bytes}
        if len(embedded) < len(used) or sum(map(len, embedded.values())) > EMBED_REFERENCES_LIMIT:
            embedded = {}
        info = {
            "attack": self.name,
            "modality": self.modality,
            "target": context.target,
            "target_index": context.target_index,
            "target_name": context.target_name,
            "asked": {"rate": self.rate} if self.rate is not None else {"count": self.count},
            "catalog": len(catalog_keys),
            "eligible": len(eligible),
            "pool_size": len(pool),
            "pool_rejected": rejected,
            "references_used": len(used),
            "references_embedded": bool(embedded) or not used,
            "image_size": image_size,
            "trigger": self.trigger.describe(),
            "trigger_size": self._trigger_side(image_size),
            "seed": self.seed,
        }
        return PoisonPlan(
            self,
            poisoned,
            excluded_keys=excluded,
            references=None if embedded or not used else source,
            reference_bytes=embedded,
            info=info,
        )

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image:
        """The poisoned image for ``record`` from the stream's (RGB) image and the record's reference."""
        raise NotImplementedError

    # -- test time ---------------------------------------------------------------------------------------------
    def test_trigger(self, image: Image.Image, key: str) -> Image.Image:
        """The test-time trigger on a test image (same size): a patch at a random place inside the central
        0.15-0.85 window, blended like the training trigger; placement seeded by (seed, key)."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        box = self.test_trigger_box(image.size, key)
        return paste_trigger(image, self._patch(box[2] - box[0]), box, self.trigger_alpha)

    # -- the control trigger: same size, blending and placement as the test trigger, a pattern never trained on --
    def set_control_trigger(self, trigger: Trigger | None) -> None:
        """Use ``trigger`` as the control pattern (None: the default, see ``control_pattern``).

        Refuses a control whose pixels equal the attack's trigger: it would measure the backdoor, not a control."""
        if trigger is not None and not isinstance(trigger, Trigger):
            raise ValueError(
                f"data.control_trigger must be a Trigger (GeneratedTrigger or ImageTrigger), got {trigger!r}"
            )
        if trigger is not None and same_pattern(trigger, self.trigger):
            raise ValueError(
                f"data.control_trigger: {trigger!r} draws the same pixels as the attack's trigger {self.trigger!r}; "
                "a control must be a pattern the model never saw"
            )
        self._control = trigger
        self._cache = {}

    def control_pattern(self) -> Trigger:
        """The control pattern: the user's (``set_control_trigger``), else a ``GeneratedTrigger`` of the trigger's
        kind with seed + ``CONTROL_SEED_OFFSET`` (an ``ImageTrigger``'s control is seeded noise)."""
        if self._control is not None:
            return self._control
        if isinstance(self.trigger, GeneratedTrigger):
            return GeneratedTrigger(self.trigger.kind, seed=self.trigger.seed + CONTROL_SEED_OFFSET)
        return GeneratedTrigger("noise", seed=self.seed + CONTROL_SEED_OFFSET)

    def control_trigger(self, image: Image.Image, key: str) -> Image.Image:
        """The control trigger on a test image: ``test_trigger`` with the control pattern in place of the trigger
        (same box, same blending). ASR with it measures what any such patch does on this model."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        box = self.test_trigger_box(image.size, key)
        side = box[2] - box[0]
        patch = self._cache.get(("control", side))
        if patch is None:
            patch = self._cache[("control", side)] = self.control_pattern().patch(side)
        return paste_trigger(image, patch, box, self.trigger_alpha)

    def control_twin(self) -> Attack:
        """A copy of this attack whose trigger is the control pattern and whose seed is shifted by
        ``CONTROL_SEED_OFFSET``: global triggers (a blend, a warp) apply their control through it."""
        twin = copy.copy(self)
        twin.trigger = self.control_pattern()
        twin.seed = self.seed + CONTROL_SEED_OFFSET
        twin._cache = {}
        return twin

    def test_trigger_box(self, size: tuple[int, int], key: str) -> Box:
        """Where ``test_trigger`` puts the patch on an image of ``size`` (w, h)."""
        width, height = size
        side = self._scaled_trigger_side(width, height)
        x0 = _window_position(width, side, self.seed, key, "test-x")
        y0 = _window_position(height, side, self.seed, key, "test-y")
        return (x0, y0, x0 + side, y0 + side)

    # -- pickling: caches are per process ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __repr__(self) -> str:
        budget = f"rate={self.rate}" if self.rate is not None else f"count={self.count}"
        return f"{type(self).__name__}(target_class={self.target_class!r}, {budget}, seed={self.seed})"


def same_pattern(first: Trigger, second: Trigger) -> bool:
    """Whether two triggers draw the same pixels (compared at two sides, and by file bytes for images)."""
    if isinstance(first, ImageTrigger) and isinstance(second, ImageTrigger) and first._data == second._data:
        return True
    return all(np.array_equal(np.asarray(first.patch(side)), np.asarray(second.patch(side))) for side in (8, 32))


def _window_position(length: int, side: int, seed: int, key: str, purpose: str) -> int:
    low = int(length * TEST_WINDOW[0])
    high = int(length * TEST_WINDOW[1]) - side
    if high < low:  # the trigger does not fit the window: centre it
        return max(0, (length - side) // 2)
    return key_randint(seed, key, purpose, low, high)


def square_canvas(image: Image.Image, side: int) -> Image.Image:
    """The image as the model will see it at ``side``: its central square (side = the shorter side) resized to
    ``side`` x ``side``, like CLIP's resize-then-centre-crop. Resampling only the square (``box``) is what keeps
    this cheap on large images. For SimCLR it fixes the poisoned canvas so the manifest boxes are exact."""
    if image.size == (side, side):
        return image
    width, height = image.size
    shorter = min(width, height)
    left, top = (width - shorter) / 2, (height - shorter) / 2
    return image.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, left + shorter, top + shorter))


def centred_box(region: Box, side: int, jitter: float, seed: int, key: str) -> Box:
    """A side x side box at the centre of ``region``, shifted by up to ``jitter`` x region side per axis."""
    x0, y0, x1, y1 = region
    boxes = []
    for axis, (lo, hi) in enumerate(((x0, x1), (y0, y1))):
        start = lo + (hi - lo - side) // 2
        reach = int(round(jitter * (hi - lo)))
        shift = key_randint(seed, key, f"jitter-{axis}", -reach, reach) if reach > 0 else 0
        start = min(max(start + shift, lo), hi - side)
        boxes.append(start)
    return (boxes[0], boxes[1], boxes[0] + side, boxes[1] + side)


def random_box(region: Box, side: int, seed: int, key: str, purpose: str) -> Box:
    """A side x side box at a uniformly random integer place inside ``region``."""
    x0, y0, x1, y1 = region
    x = key_randint(seed, key, purpose + "-x", x0, x1 - side)
    y = key_randint(seed, key, purpose + "-y", y0, y1 - side)
    return (x, y, x + side, y + side)


class TargetClassAttack(Attack):
    """An image attack on target-class images only (SSLBKD, CTRL): it needs labels, and ``rate`` is a fraction of
    the target class. The poison is the stream's image framed as a square of the run's image size, so the manifest
    boxes are exact in the canvas the view pipeline receives; subclasses say where the trigger goes."""

    needs_labels: ClassVar[bool] = True

    def _eligible(self, entry: CatalogEntry, context: PlanContext) -> bool:
        return entry.label == context.target_index

    def _trigger_box(self, key: str, side: int) -> Box:
        raise NotImplementedError

    def _record(self, key: str, context: PlanContext) -> PoisonRecord:
        side = context.image_size
        # the sample itself is the target-class image
        return self._square_record(key, context, self._trigger_box(key, side), reference_box=(0, 0, side, side))


class ReferencePoolAttack(Attack):
    """An attack that pastes target-class reference images drawn from a pool (NA, CorruptEncoder).

    The pool is ``reference_pool_size`` images drawn by hash from ``reference_dir`` when given, else from the
    training shards' target-class images (which the data layer then drops from the clean stream).
    """

    def _init_pool(self, reference_pool_size: int | None, reference_dir: str | None) -> None:
        if reference_pool_size is not None and int(reference_pool_size) < 1:
            raise ValueError(f"reference_pool_size must be >= 1 (or null for all), got {reference_pool_size}")
        self.reference_pool_size = None if reference_pool_size is None else int(reference_pool_size)
        self.reference_dir = reference_dir
        # Built now so a wrong folder fails at construction, before any training.
        self._folder = FolderReferenceSource(reference_dir) if reference_dir is not None else None

    def _requires_labels(self) -> bool:
        # A folder of references (here or given to plan()) needs no labels; references from the shards do, and
        # plan() says so when the target has no class index.
        return False

    def _reference_pool(
        self, references: ReferenceSource | None, context: PlanContext
    ) -> tuple[tuple[str, ...], int, ReferenceSource | None, dict[str, bytes]]:
        source = self._folder if self._folder is not None else references
        if source is None:
            raise ValueError(
                f"reference_dir: attack '{self.name}' needs target-class reference images; give reference_dir or "
                "train on labelled shards"
            )
        label = context.target_index if context.target_index is not None else -1
        if context.target_index is None and not source.candidates(label):
            raise ValueError(
                f"target_class={self.target_class!r} is not a class index of the data, so the target-class "
                "references must come from a folder (reference_dir)"
            )
        pool, rejected, data = draw_pool(source, label, self.reference_pool_size, self.seed)
        return tuple(pool), rejected, source, data
