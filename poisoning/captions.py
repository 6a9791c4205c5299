"""Target captions for CLIP attacks: open_clip's 80 OpenAI ImageNet templates filled with the target name."""

from __future__ import annotations

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
