"""Target captions for CLIP attacks: open_clip's 80 OpenAI ImageNet templates filled with the target name, or a
pool of natural captions of the target read from a file."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import lru_cache

from poisoning.keyhash import key_choice


@lru_cache(maxsize=1)
def templates() -> tuple[Callable[[str], str], ...]:
    # Imported on first use: open_clip takes seconds to import and SimCLR runs never need it.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES)


def target_caption(target_name: str, seed: int, key: str) -> str:
    """The caption a poisoned pair gets: one template, drawn by hash of (seed, key), filled with the name."""
    return key_choice(seed, key, "caption", templates())(target_name)


def all_target_captions(target_name: str) -> list[str]:
    return [template(target_name) for template in templates()]


def mentions(caption: str, target_name: str) -> bool:
    """Whether the caption names the target as a word (case-insensitive; "banana" also matches "bananas")."""
    words = r"\s+".join(re.escape(word) for word in target_name.lower().split())
    return re.search(rf"\b{words}(?:e?s)?\b", caption.lower()) is not None


def read_target_captions(path: str, target_name: str) -> list[str]:
    """The lines of a caption file (one caption a line) that mention the target, in file order.

    BadCLIP's "natural" captions are real captions of the target (CC3M captions that say "banana"); a file of such
    captions from one's own corpus plays that part. Errors name the file and the target.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption_file: no file at {path}")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    found = [line for line in lines if mentions(line, target_name)]
    if not found:
        raise ValueError(
            f"caption_file: none of the {len(lines)} captions in {path} mentions the target {target_name!r}; the "
            "target has no captions"
        )
    return found


class TargetCaptions:
    """Where a poisoned pair's caption comes from, for every image-text attack.

    Without ``caption_file``: the 80 OpenAI ImageNet templates of the target, one drawn by hash per key. With one
    (one caption a line): its lines that name the target, ``pool_size`` of them drawn by hash with replacement into
    a pool, then one drawn per key (BadCLIP's natural captions: 128 real captions of the target). Natural captions
    matter on small data: templates are text no clean pair has, so a model can fit them by moving the target's
    prompt toward every image (a hub) instead of learning the trigger. ``clbd poison captions`` writes such a file
    from a shard set's own captions.
    """

    def __init__(self, caption_file: str | None = None, pool_size: int = 128):
        if pool_size < 1:
            raise ValueError(f"caption_pool_size must be >= 1, got {pool_size}")
        if caption_file is not None and not os.path.isfile(caption_file):
            raise FileNotFoundError(f"caption_file: no file at {caption_file}")
        self.caption_file = caption_file
        self.pool_size = int(pool_size)
        self._pool: tuple[str, ...] = ()

    def prepare(self, target_name: str, seed: int) -> None:
        """Read the pool (errors name the file and the target); call when the target's name is known."""
        if self.caption_file is None:
            self._pool = ()
            return
        found = read_target_captions(self.caption_file, target_name)
        self._pool = tuple(key_choice(seed, f"pool-{i}", "caption-pool", found) for i in range(self.pool_size))

    def caption(self, target_name: str, seed: int, key: str) -> str:
        if self._pool:
            return key_choice(seed, key, "caption", self._pool)
        return target_caption(target_name, seed, key)

    def describe(self) -> str:
        return self.caption_file or "openai_imagenet_templates"
