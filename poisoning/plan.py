"""The poison plan: which keys are poisoned, how, and the stage that applies it to a stream.

An attack's ``plan()`` runs once in the main process over the catalog of training keys. The resulting
``PoisonPlan`` is small and picklable: every DataLoader worker gets a copy and calls ``apply(sample)`` on each
decoded sample. All decisions (poisoned or not, reference image, arrangement, boxes, caption) are made at plan
time as pure functions of (seed, key), so any worker, rank or restart renders the same bytes for a key, and the
manifest written from the plan is the ground truth of what the stream contains.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from poisoning.keyhash import key_uniform

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CatalogEntry:
    """One training key as the data layer found it in the tar headers; label -1 when unknown."""

    key: str
    label: int = -1


@runtime_checkable
class ReferenceSource(Protocol):
    """Target-class images the attacker holds (NA / CorruptEncoder reference pools).

    Implementations must be picklable (the plan carries the source to the workers, which load the few
    references they need lazily) and ``load`` must return the same bytes for a key on every call.
    """

    def candidates(self, target_label: int) -> list[str]:
        """Keys of the target-class images available to the attacker."""
        ...

    def load(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Encoded image bytes for each requested key."""
        ...


@dataclass(frozen=True)
class PoisonRecord:
    """One poisoned key, as the manifest records it.

    Boxes are (x0, y0, x1, y1) in pixels of the poisoned canvas (``canvas_size`` = (w, h)), x1/y1 exclusive:
    ``reference`` where the target-class reference sits, ``shadow`` where the stream's own image sits,
    ``trigger`` where the trigger was pasted (the whole canvas for global triggers).
    """

    key: str
    attack: str
    target: int | str
    canvas_size: tuple[int, int]
    trigger_box: Box
    reference_key: str | None = None
    arrangement: str | None = None
    reference_box: Box | None = None
    shadow_box: Box | None = None
    caption: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "attack": self.attack,
            "target": self.target,
            "reference_key": self.reference_key,
            "arrangement": self.arrangement,
            "canvas_size": list(self.canvas_size),
            "boxes": {
                "reference": list(self.reference_box) if self.reference_box is not None else None,
                "shadow": list(self.shadow_box) if self.shadow_box is not None else None,
                "trigger": list(self.trigger_box),
            },
            "caption": self.caption,
        }


def select_keys(
    eligible: Iterable[str], seed: int, *, rate: float | None = None, count: int | None = None
) -> list[str]:
    """The poisoned subset of ``eligible``: a pure function of (seed, key), independent of order.

    With ``rate``: key is poisoned iff blake2b(f"{seed}:{key}") / 2**64 < rate. With ``count``: the ``count`` keys
    with the smallest hash (ties broken by key). Returned sorted by key.
    """
    if (rate is None) == (count is None):
        raise ValueError("give exactly one of rate or count")
    keys = sorted(set(eligible))
    if rate is not None:
        return [k for k in keys if key_uniform(seed, k) < rate]
    if count > len(keys):
        raise ValueError(f"count={count} but only {len(keys)} eligible keys exist for this attack; lower count")
    ranked = sorted(keys, key=lambda k: (key_uniform(seed, k), k))
    return sorted(ranked[:count])


class Renderer(Protocol):
    """What a plan needs of its attack (``poisoning.base.Attack``): the poisoned image of one record."""

    def render(self, image: Image.Image, record: PoisonRecord, reference: Image.Image | None) -> Image.Image: ...


class PoisonPlan:
    """Which keys are poisoned and how; ``apply`` renders a poisoned sample from a clean one.

    Attributes:
        poisoned: key -> PoisonRecord.
        excluded_keys: reference-pool keys that come from the training shards; the data layer drops them from the
            clean stream (the attacker's reference images are not also training samples).
        reference_bytes: encoded bytes of the references the records use, read once at plan time, so workers
            never go back to the shards; empty when they exceed ``EMBED_REFERENCES_LIMIT``, and then
            ``references`` (the source, which must then be picklable) is loaded lazily, once per reference and
            process.
    """

    def __init__(
        self,
        attack: Renderer,
        poisoned: dict[str, PoisonRecord],
        *,
        excluded_keys: frozenset[str] = frozenset(),
        references: ReferenceSource | None = None,
        reference_bytes: dict[str, bytes] | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.attack = attack
        self.poisoned = dict(poisoned)
        self.excluded_keys = frozenset(excluded_keys)
        self.references = references
        self.reference_bytes = dict(reference_bytes or {})
        self.info = dict(info or {})
        self._reference_cache: dict[tuple[str, int, int], Image.Image] = {}

    # -- pickling: the decoded-reference cache is per process --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reference_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.poisoned)

    def __contains__(self, key: object) -> bool:
        return key in self.poisoned

    def is_poisoned(self, key: str) -> bool:
        return key in self.poisoned

    def apply(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample with ``poisoned`` added; poisoned keys get a new ``image`` (and ``text`` for CLIP)."""
        record = self.poisoned.get(sample["__key__"])
        if record is None:
            out = dict(sample)
            out["poisoned"] = False
            return out
        reference = self._reference_image(record) if record.reference_key is not None else None
        image = sample["image"]
        if image.mode != "RGB":
            image = image.convert("RGB")
        out = dict(sample)
        out["image"] = self.attack.render(image, record, reference)
        if record.caption is not None:
            out["text"] = record.caption
        out["poisoned"] = True
        return out

    def _reference_image(self, record: PoisonRecord) -> Image.Image:
        box = record.reference_box
        assert box is not None and record.reference_key is not None
        size = (box[2] - box[0], box[3] - box[1])
        cache_key = (record.reference_key, size[0], size[1])
        image = self._reference_cache.get(cache_key)
        if image is None:
            data = self.reference_bytes.get(record.reference_key)
            if data is None:
                if self.references is None:
                    raise RuntimeError(f"poison plan: no bytes and no source for reference {record.reference_key}")
                data = self.references.load([record.reference_key])[record.reference_key]
            image = decode_rgb(data).resize(size, Image.Resampling.BILINEAR)
            self._reference_cache[cache_key] = image
        return image

    def records(self) -> list[PoisonRecord]:
        return [self.poisoned[k] for k in sorted(self.poisoned)]

    def manifest_lines(self) -> list[str]:
        return [json.dumps(r.to_manifest(), separators=(",", ":"), ensure_ascii=True) for r in self.records()]

    def write_manifest(self, path: str | os.PathLike) -> None:
        """JSON lines, one per poisoned key, sorted by key: the same bytes for the same plan."""
        text = "".join(line + "\n" for line in self.manifest_lines())
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="ascii", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)

    def summary(self) -> dict[str, Any]:
        """Attack, target, what was asked, how many keys were eligible and how many were actually poisoned."""
        out = dict(self.info)
        out["poisoned"] = len(self.poisoned)
        out["excluded"] = len(self.excluded_keys)
        return out


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def records_from_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a manifest back (for defenses scoring detection against it)."""
    with open(path, encoding="ascii") as handle:
        return [json.loads(line) for line in handle if line.strip()]
