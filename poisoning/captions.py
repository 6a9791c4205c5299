"""Target captions for CLIP attacks: open_clip's 80 OpenAI ImageNet templates filled with the target name."""

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
